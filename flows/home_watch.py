"""Run a command while a file exists: `python home_watch.py WATCHED -- COMMAND...` (run by path: it imports nothing
of vidtune's, so it costs a few MB).

vidtune starts its local Prefect server under this watch, watching the server's state file in $VIDTUNE_HOME/run: if
VIDTUNE_HOME is deleted, `vidtune server stop` can no longer find the server, so the watch stops it (SIGTERM, then
SIGKILL after a grace period) and exits. It leads the command's process group, so stopping the group stops both; it
exits with the command's exit code when the command ends; SIGTERM and SIGINT are passed on."""

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
APPEAR_S = 60.0  # the state file is written just after the watch starts
GRACE_S = 20.0


def main() -> None:
    watched, separator, *command = sys.argv[1:]
    assert separator == "--" and command, "usage: home_watch.py WATCHED -- COMMAND..."
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    seen, started = False, time.monotonic()
    while child.poll() is None:
        time.sleep(POLL_S)
        exists = os.path.exists(watched)
        seen = seen or exists
        if (seen and not exists) or (not seen and time.monotonic() - started > APPEAR_S):
            print(f"home_watch: {watched} is gone (VIDTUNE_HOME deleted?): stopping pid {child.pid}", flush=True)
            child.terminate()
            try:
                child.wait(GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
            break
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
