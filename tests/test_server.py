"""The local Prefect server and the warm worker, as a user meets them: no PREFECT_API_URL, a new VIDTUNE_HOME
(a new database), `vidtune curate` twice, then `vidtune server status` and `vidtune server stop`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.test_ui_path import free_port
from vidtune.flows.server import configured_api_url, pid_alive
from vidtune.flows.worker import fingerprint

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def vidtune(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vidtune.flows.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_first_command_starts_server_and_worker_later_ones_reuse_them_and_stop_ends_them(
    tmp_path, raw_videos, cli_sets
):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(raw_videos[1][0].path, raw)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "VIDTUNE_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "VIDTUNE_SERVER_PORT": str(port),
        "VIDTUNE_WORKER": "1",
        "VIDTUNE_LOCAL_SERVER": "1",
        "COLUMNS": "200",
    }
    status = lambda: json.loads(vidtune("server", "status", "--json", env=env, cwd=tmp_path).stdout)  # noqa: E731
    try:
        first = vidtune(
            "curate", "raw", "out1", *cli_sets, env=env, cwd=tmp_path
        )  # relative paths: the caller's folder
        assert first.returncode == 0, first.stdout + first.stderr
        said = first.stdout + first.stderr
        assert (
            "starting a local Prefect server" in said
            and f"http://127.0.0.1:{port}" in said
            and "vidtune server stop" in said
        )
        assert "started a warm vidtune worker" in said and "127.0.0.1 only" in said

        second = vidtune("curate", "raw", "out2", *cli_sets, env=env, cwd=tmp_path)
        assert second.returncode == 0 and "started" not in second.stdout + second.stderr, second.stdout + second.stderr
        state = status()
        (worker,) = state["workers"]
        assert state["server"]["healthy"] and state["server"]["port"] == port and worker["served"] == 2
        assert ["vidtune-tiny-clip", cli_sets[-1].split("=", 2)[2], "cpu"] in worker[
            "models"
        ]  # CLIP stays loaded for the next run
        kept = [
            sorted(pq.read_table(tmp_path / o / "manifest.parquet").to_pandas().query("status == 'kept'").clip_id)
            for o in ("out1", "out2")
        ]
        assert kept[0] == kept[1] and kept[0]  # the same work as in-process
        runs = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter", json={}).json()
        assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED"]  # both runs are in the UI

        missing = vidtune("curate", "nope", "out3", env=env, cwd=tmp_path)  # an error's message and exit code come back
        assert missing.returncode == 2 and "does not exist" in missing.stdout

        # Ctrl-C in the caller interrupts the run in the worker; the worker stays up for the next command
        log = (tmp_path / "interrupted.log").open("w")
        caller = subprocess.Popen(
            [sys.executable, "-m", "vidtune.flows.cli", "curate", str(raw_videos[0]), "out4", *cli_sets],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while "Beginning flow run" not in (tmp_path / "interrupted.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=90) != 0
        assert status()["workers"][0]["served"] == 4
    finally:
        stopped = vidtune("server", "stop", env=env, cwd=tmp_path)
    assert (
        stopped.returncode == 0
        and "stopped 1 warm worker(s)" in stopped.stdout
        and "stopped the Prefect server" in stopped.stdout
    )
    assert not pid_alive(state["server"]["pid"]) and not pid_alive(worker["pid"]) and not listening(port)
    assert status() == {"server": None, "workers": [], "configured_api_url": None}


def test_a_configured_api_wins_and_the_worker_is_per_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert configured_api_url() is None
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n'
    )
    assert configured_api_url() == "http://prefect.internal:4200/api"  # the active profile, as Prefect reads it
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert configured_api_url() == "http://127.0.0.1:9/api"

    env = {"PATH": "/usr/bin", "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    assert fingerprint(env) == fingerprint(env | {"TERM": "xterm", "VIDTUNE_WORKER": "1"})  # read per command
    assert fingerprint(env) != fingerprint(env | {"PREFECT_API_URL": "http://127.0.0.1:2/api"})  # read once at import
    assert fingerprint(env) != fingerprint(env | {"HF_HOME": "/elsewhere"})


def test_prefects_temporary_server_waits_long_enough_for_a_cold_first_start():
    """With VIDTUNE_LOCAL_SERVER=0 each command starts Prefect's temporary server, whose first start on a new machine
    (database migrations) outlasts Prefect's default 20 s: every command's flows raise the wait to 600 s."""
    probe = (
        "import importlib, sys\n"
        "from flows import cli\n"  # what `vidtune` imports first
        "for name in ('vidtune.flows.curate', 'vidtune.flows.finetune', 'vidtune.flows.evaluate', 'vidtune.flows.demo'):\n"
        "    importlib.import_module(name)\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "600", result.stdout + result.stderr


def test_a_server_and_worker_whose_vidtune_home_is_deleted_exit_on_their_own(tmp_path):
    """With $VIDTUNE_HOME gone, `vidtune server stop` cannot find them: the server's watch and the idle worker
    notice their state file and socket are gone and exit, instead of running on with no way to stop them."""
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "VIDTUNE_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "VIDTUNE_SERVER_PORT": str(port),
        "VIDTUNE_WORKER": "1",
    }
    started = vidtune("server", "start", env=env, cwd=tmp_path)
    assert started.returncode == 0, started.stdout + started.stderr
    server = json.loads((home / "run" / "server.json").read_text())["pid"]
    spawn = "from vidtune.flows.worker import ensure_worker, wait_for_worker; fp, _ = ensure_worker('vidtune.flows.cli:app'); assert wait_for_worker(fp)"
    subprocess.run([sys.executable, "-c", spawn], env=env, check=True, timeout=300)
    (worker_file,) = (home / "run").glob("worker-*.json")
    worker = json.loads(worker_file.read_text())["pid"]
    assert pid_alive(server) and pid_alive(worker) and listening(port)
    shutil.rmtree(home)
    deadline = time.monotonic() + 60
    while (pid_alive(server) or pid_alive(worker) or listening(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pid_alive(server) and not pid_alive(worker) and not listening(port)
