"""The local Prefect server vidtune starts once and reuses when no `PREFECT_API_URL` is configured.

Prefect's temporary server costs every command 7-22 s (and times out on a cold first start); one long-lived
server on 127.0.0.1 costs that once, keeps every CLI run in the Prefect UI, and `vidtune server stop` ends it.
Stdlib only: the CLI decides where flows report before anything heavy is imported.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vidtune.training.files import write_json_atomic

DEFAULT_PORT = 4200  # Prefect's own default, so the UI is where people expect it; another free port if taken
START_TIMEOUT_S = 300  # a first start on a new machine migrates a new database: far past Prefect's 20 s default


def vidtune_home() -> Path:
    return Path(os.environ.get("VIDTUNE_HOME", "~/.vidtune")).expanduser()


def run_dir() -> Path:
    """Where the server and workers keep their state, logs and sockets (private to the user)."""
    folder = vidtune_home() / "run"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two commands started together start one server, not two)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(pid: int, grace_s: float = 20) -> None:
    """SIGTERM the process group `pid` leads, then SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # our own child: reap it so it stops counting as alive
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.2)


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile (what Prefect itself would use)."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(profiles_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def healthy(api_url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port() -> int:
    if wanted := os.environ.get("VIDTUNE_SERVER_PORT"):
        return int(wanted)
    if port_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerState:
    pid: int
    port: int
    database: str
    log: str
    started: float

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _state_path() -> Path:
    return run_dir() / "server.json"


def server_state() -> ServerState | None:
    """The server vidtune started, if its process is still alive."""
    try:
        state = ServerState(**json.loads(_state_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return state if pid_alive(state.pid) else None


def launch_server(say=print) -> tuple[ServerState, bool]:
    """The local server's state, launching it in the background first if it is not running (without waiting:
    callers overlap the start with other work, then `wait_for_server`). Returns (state, launched_now)."""
    with file_lock(run_dir() / "server.lock"):
        if state := server_state():  # running, or being started by another command
            return state, False
        database = vidtune_home() / "prefect" / "prefect.db"
        database.parent.mkdir(parents=True, exist_ok=True)
        port, log = pick_port(), run_dir() / "server.log"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{database}")
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        # Under a watch of its state file: with VIDTUNE_HOME deleted, nothing could stop it, so the watch does.
        command = [sys.executable, str(Path(__file__).with_name("home_watch.py")), str(_state_path()), "--", *command]
        say(f"starting a local Prefect server on 127.0.0.1:{port} (a first start sets up its database: up to a minute)")
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        state = ServerState(process.pid, port, env["PREFECT_API_DATABASE_CONNECTION_URL"], str(log), time.time())
        write_json_atomic(_state_path(), asdict(state))
        return state, True


def wait_for_server(state: ServerState, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until the server answers, however long a first start takes; a server that died or never answers
    is stopped and reported with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(state.api_url):
            return
        try:
            os.waitpid(state.pid, os.WNOHANG)  # reap it if it is our child and exited
        except ChildProcessError:
            pass
        if not pid_alive(state.pid):
            break
        time.sleep(0.3)
    stop_process_group(state.pid)
    _state_path().unlink(missing_ok=True)
    tail = Path(state.log).read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"the local Prefect server on port {state.port} did not come up within {timeout_s:.0f} s; its log ({state.log}) ends:\n{tail}"
    )


def start_server(timeout_s: float = START_TIMEOUT_S, say=print) -> tuple[ServerState, bool]:
    """The running local server, or a new one started and waited for. Returns (state, started_now)."""
    state, started = launch_server(say=say)
    wait_for_server(state, timeout_s)
    return state, started


def stop_server() -> ServerState | None:
    """Stop the server vidtune started (its runs stay in the database). Returns what was stopped."""
    with file_lock(run_dir() / "server.lock"):
        state = server_state()
        if state:
            stop_process_group(state.pid)
        _state_path().unlink(missing_ok=True)
        return state


def use_local_server(say=print) -> tuple[ServerState, bool] | None:
    """Point this process's Prefect client at vidtune's local server unless an API is configured, launching
    the server if needed (not waited for: see `wait_for_server`). Must run before `prefect` is imported, since
    Prefect reads its settings once. Returns (state, launched_now), or None when PREFECT_API_URL is configured."""
    if configured_api_url():
        return None
    state, launched = launch_server(say=say)
    os.environ["PREFECT_API_URL"] = state.api_url
    return state, launched


def announce(state: ServerState, say=print) -> None:
    say(
        f"the Prefect UI is at {state.ui_url} (runs kept in {state.database.split(':///')[-1]}); the server listens on 127.0.0.1 "
        "only and keeps running after this command: `vidtune server stop` ends it"
    )
