"""A warm worker: one background process per environment that has torch, Prefect, open_clip and diffusers
imported (and the CLIP models recent runs used loaded), so a small `vidtune curate` does not pay ≈ 15 s of
imports and model loading each time.

The CLI hands a command to it over a Unix socket in $VIDTUNE_HOME/run (user-only; no network port) and passes
its own stdin/stdout/stderr along, so output, colours and progress bars go straight to the caller's terminal.
The worker forks a child per command; the child takes the caller's environment, folder and arguments and runs
the same typer app the CLI runs in-process. Ctrl-C in the caller interrupts the child. The worker exits after
`VIDTUNE_WORKER_IDLE_S` (default 900) idle seconds, or with `vidtune server stop`; `VIDTUNE_WORKER=0` turns the
hand-off off.

Fork safety: the parent never runs a multi-threaded torch op (libgomp hangs a child whose parent used its
thread pool) and never touches CUDA; each child restores the thread count and initialises devices itself.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidtune.flows.server import file_lock, pid_alive, run_dir, stop_process_group
from vidtune.training.files import write_json_atomic

# Commands worth handing off (the heavy imports); the rest start fast in-process.
WARM_COMMANDS = {"curate", "finetune", "evaluate", "register", "generate", "demo", "tiny-model", "synth-videos"}
# Settings these libraries read once at import: a worker serves only callers whose values match its own.
_ENV_PREFIXES = (
    "PREFECT_",
    "VIDTUNE_",
    "MLFLOW_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "DIFFUSERS_",
    "TORCH",
    "PYTORCH_",
    "OMP_",
    "MKL_",
    "CUDA_",
    "NVIDIA_",
    "DASK_",
    "RAY_",
    "PYTHON",
)
_PACKAGES = ("flows", "tasks", "training", "evaluation")
START_TIMEOUT_S = 300
_HEADER = struct.Struct("!I")


def fingerprint(env: dict[str, str] | None = None) -> str:
    """Interpreter, vidtune's code (an edit or upgrade starts a fresh worker) and the import-time settings."""
    env = os.environ if env is None else env
    digest = hashlib.sha256(sys.executable.encode())
    for key in sorted(k for k in env if k.startswith(_ENV_PREFIXES) and k not in ("VIDTUNE_WORKER",)):
        digest.update(f"{key}={env[key]}\0".encode())
    root = Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_size}\0".encode())
    return digest.hexdigest()[:16]


def socket_path(fp: str) -> Path:
    path = run_dir() / f"worker-{fp}.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        short = Path(f"/tmp/vidtune-{os.getuid()}")
        short.mkdir(mode=0o700, exist_ok=True)
        path = short / path.name
    return path


@dataclass
class WorkerState:
    pid: int
    socket: str
    fingerprint: str
    started: float
    served: int = 0
    models: list = field(default_factory=list)
    log: str = ""


def worker_states() -> list[WorkerState]:
    """The workers alive now (stale state files are removed)."""
    states = []
    for path in sorted(run_dir().glob("worker-*.json")):
        try:
            state = WorkerState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if pid_alive(state.pid):
            states.append(state)
        else:
            path.unlink(missing_ok=True)
    return states


def stop_workers() -> list[WorkerState]:
    stopped = worker_states()
    for state in stopped:
        stop_process_group(state.pid)
        (run_dir() / f"worker-{state.fingerprint}.json").unlink(missing_ok=True)
        Path(state.socket).unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------------------------- the caller's side


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def spawn_worker(fp: str, entry: str) -> subprocess.Popen | None:
    """Start the worker for this environment in the background unless one is running (or starting); it runs the
    typer app `entry` (module:attribute) for each command."""
    path = socket_path(fp)
    with file_lock(run_dir() / f"worker-{fp}.lock"):
        if (sock := _connect(path)) is not None:
            sock.close()
            return None
        for state in worker_states():
            if state.fingerprint == fp:  # alive and still importing
                return None
        log = run_dir() / f"worker-{fp}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "vidtune.flows.worker", str(path), fp, entry],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ.copy(),
            )
        write_json_atomic(
            run_dir() / f"worker-{fp}.json", asdict(WorkerState(process.pid, str(path), fp, time.time(), log=str(log)))
        )
        return process


def wait_for_worker(fp: str, timeout_s: float = START_TIMEOUT_S) -> socket.socket | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (sock := _connect(socket_path(fp))) is not None:
            return sock
        if not any(s.fingerprint == fp for s in worker_states()):
            return None  # it died while starting; its log says why
        time.sleep(0.2)
    return None


def wants_worker(argv: list[str]) -> bool:
    return (
        os.environ.get("VIDTUNE_WORKER", "1") != "0"
        and bool(argv)
        and argv[0] in WARM_COMMANDS
        and not ({"--help", "-h", "--list-params"} & set(argv))
    )


def ensure_worker(entry: str) -> tuple[str, subprocess.Popen | None]:
    """This environment's fingerprint, and the worker process (serving the typer app `entry`, module:attribute) if it
    had to be started now (not waited for)."""
    fp = fingerprint()
    if (sock := _connect(socket_path(fp))) is not None:
        sock.close()
        return fp, None
    return fp, spawn_worker(fp, entry)


def hand_off(argv: list[str], fp: str, started: subprocess.Popen | None, say=print) -> int | None:
    """Run `vidtune ARGV` in the warm worker `fp` (waiting for it to come up) and return its exit code; None
    when no worker came up, so the command runs here instead."""
    sock = wait_for_worker(fp)
    if sock is None:
        say(f"the warm worker did not start (see {run_dir() / f'worker-{fp}.log'}); running in this process")
        return None
    if started:
        say(
            f"started a warm vidtune worker (pid {started.pid}) that keeps imports and models loaded between commands; it "
            "takes commands over a socket in $VIDTUNE_HOME/run (no network port), exits after "
            f"{int(os.environ.get('VIDTUNE_WORKER_IDLE_S', 900)) // 60} idle minutes, and `vidtune server stop` ends it"
        )
    return _run_remote(sock, argv)


def _run_remote(sock: socket.socket, argv: list[str]) -> int:
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask()}
    _send(sock, request, fds=[0, 1, 2])
    reader = sock.makefile("r")

    def forward(signum, _frame):  # Ctrl-C here interrupts the run there
        try:
            _send(sock, {"signal": signum})
        except OSError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for line in reader:
            message = json.loads(line)
            if "exit" in message:
                return int(message["exit"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    print("vidtune: the warm worker stopped before the command finished (`vidtune server status`)", file=sys.stderr)
    return 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------- the worker's side


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    if len(data) < _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("not a command (a connection check)")
    (size,) = _HEADER.unpack_from(data)
    body = data[_HEADER.size :]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("caller went away")
        body += chunk
    conn.settimeout(None)
    return json.loads(body), fds


def _entry_point(entry: str):
    """The typer app `module:attribute` names (the caller's CLI: the worker does not import it by name)."""
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _warm_up(entry: str) -> int:
    """Import what the commands import (single-threaded torch: see the module note). Returns torch's default
    thread count, which each child restores."""
    os.environ.setdefault(
        "PYTORCH_NVML_BASED_CUDA_CHECK", "1"
    )  # a CUDA availability check must not initialise CUDA here
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import vidtune.evaluation.inference  # noqa: F401

    _entry_point(entry)  # the CLI and what its commands import at module level
    import vidtune.flows.curate  # noqa: F401
    import vidtune.flows.evaluate  # noqa: F401
    import vidtune.flows.finetune  # noqa: F401
    import vidtune.tasks.synthetic_videos  # noqa: F401
    import vidtune.training.tiny_models  # noqa: F401

    return threads


def _preload(models: list[list]) -> None:
    """Load, in the worker, the CPU CLIP models children used, so the next child has them (copy-on-write)."""
    from vidtune.tasks.annotate import load_clip_scorer

    for name, pretrained, device in models:
        if device == "cpu":
            try:
                load_clip_scorer(name, pretrained, device)
            except Exception as exc:  # noqa: BLE001 - a child will load (and report) it itself
                print(f"could not preload CLIP {name} {pretrained}: {exc}", flush=True)


def _loaded_models() -> list[list]:
    """[model, pretrained, device] of the CPU CLIP scorers this process holds."""
    from vidtune.tasks.scoring import ClipScorer, _models

    return [
        [k[1], k[2], k[-1]]
        for k, v in _models.items()
        if isinstance(v, ClipScorer) and k[0] == "clip" and k[-1] == "cpu"
    ]


def _child(
    listener: socket.socket,
    conn: socket.socket,
    request: dict,
    fds: list[int],
    threads: int,
    report: int,
    entry: str,
) -> None:
    """In the forked child: become the caller's process, run the command, exit with its code."""
    code = 1
    try:
        listener.close()
        conn.close()
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        atexit._clear()  # the worker's exit handlers are not this command's
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        import torch

        torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS") or threads))
        sys.argv = ["vidtune", *request["argv"]]
        app = _entry_point(entry)

        try:
            app(args=request["argv"], prog_name="vidtune")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            code = 130
        atexit._run_exitfuncs()
        with os.fdopen(report, "w") as out:
            json.dump(_loaded_models(), out)
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the worker's loop
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


@dataclass
class _Run:
    conn: socket.socket
    report: int
    interrupted_at: float | None = None


def serve(path: Path, fp: str, entry: str) -> None:
    """The worker's loop: accept commands, fork a child for each, relay signals and exit codes."""
    started = time.time()
    threads = _warm_up(entry)
    state = WorkerState(os.getpid(), str(path), fp, started, log=str(run_dir() / f"worker-{fp}.log"))
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    write_json_atomic(run_dir() / f"worker-{fp}.json", asdict(state))
    print(f"worker {os.getpid()} ready in {time.time() - started:.1f} s on {path}", flush=True)

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    runs: dict[int, _Run] = {}
    stopping = False
    idle_s = float(os.environ.get("VIDTUNE_WORKER_IDLE_S", 900))
    last_active = time.monotonic()

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.5):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    try:
                        request, fds = _recv_request(conn)
                    except (OSError, ValueError, struct.error) as exc:  # ConnectionError is an OSError
                        if not isinstance(exc, ConnectionError):
                            print(f"bad request: {exc}", flush=True)
                        conn.close()
                        continue
                    read_end, write_end = os.pipe()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        os.close(read_end)
                        _child(listener, conn, request, fds, threads, write_end, entry)
                    os.close(write_end)
                    for fd in fds:
                        os.close(fd)
                    runs[pid] = _Run(conn, read_end)
                    selector.register(conn, selectors.EVENT_READ, pid)
                    print(f"run {pid}: vidtune {' '.join(request['argv'])} (in {request['cwd']})", flush=True)
                else:
                    _relay(key.fileobj, key.data, runs, selector)
            for pid in list(runs):
                if _reap(pid, runs, selector, state):
                    last_active = time.monotonic()
            if runs:
                last_active = time.monotonic()
            elif time.monotonic() - last_active > idle_s:
                print(f"idle for {idle_s:.0f} s: exiting", flush=True)
                break
            elif not path.exists():  # VIDTUNE_HOME deleted: `vidtune server stop` could no longer reach this worker
                print(f"{path} is gone (VIDTUNE_HOME deleted?): exiting", flush=True)
                break
    finally:
        for pid in runs:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        listener.close()
        path.unlink(missing_ok=True)
        (run_dir() / f"worker-{fp}.json").unlink(missing_ok=True)


def _relay(conn: socket.socket, pid: int, runs: dict[int, _Run], selector: selectors.BaseSelector) -> None:
    """A signal from the caller, or the caller gone (then the run is interrupted as Ctrl-C would)."""
    run = runs.get(pid)
    try:
        data = conn.recv(4096)
    except OSError:
        data = b""
    if not data:
        selector.unregister(conn)
        signum = signal.SIGINT
    else:
        signum = None
        try:  # one or more framed {"signal": N} messages; the last one counts
            while len(data) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(data)
                signum, data = (
                    json.loads(data[_HEADER.size : _HEADER.size + size])["signal"],
                    data[_HEADER.size + size :],
                )
        except (ValueError, KeyError, struct.error):
            return
        if signum is None:
            return
    if run and pid_alive(pid):
        os.kill(pid, signum)
        run.interrupted_at = run.interrupted_at or time.monotonic()


def _reap(pid: int, runs: dict[int, _Run], selector: selectors.BaseSelector, state: WorkerState) -> bool:
    run = runs[pid]
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        if run.interrupted_at and time.monotonic() - run.interrupted_at > 30:
            os.kill(pid, signal.SIGKILL)  # it ignored Ctrl-C for 30 s
        return False
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    with os.fdopen(run.report) as report:
        try:
            models = json.loads(report.read() or "[]")
        except ValueError:
            models = []
    del runs[pid]
    state.served += 1
    write_json_atomic(run_dir() / f"worker-{state.fingerprint}.json", asdict(state))
    try:
        run.conn.sendall((json.dumps({"exit": code}) + "\n").encode())
    except OSError:
        pass
    try:
        selector.unregister(run.conn)
    except (KeyError, ValueError):
        pass
    run.conn.close()
    if new := [m for m in models if m not in state.models]:  # after the caller has its answer
        _preload(new)
        state.models += new
        write_json_atomic(run_dir() / f"worker-{state.fingerprint}.json", asdict(state))
    print(f"run {pid}: exit {code}", flush=True)
    return True


if __name__ == "__main__":  # python -m vidtune.flows.worker SOCKET FINGERPRINT MODULE:APP (started by hand_off)
    serve(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
