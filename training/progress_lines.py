"""Progress that reads well where it is written: a bar on a terminal; in a file or pipe (CI logs, `> log`, a Prefect
worker's output) a line now and then, since a bar redrawn with carriage returns becomes one endless line there."""

from __future__ import annotations

import os
import sys
import time


class StepProgress:
    """tqdm's bar on a terminal; elsewhere a line at every `every_percent` % of `total` (and at the end): `desc: 12/40
    steps (30 %), loss=0.1234, lr=1.00e-04, 0:00:09`. The postfix shown is the one set before `update`."""

    def __init__(
        self, total: int, initial: int = 0, desc: str = "", unit: str = "step", disable: bool = False, stream=None
    ):
        self.stream = stream or sys.stderr
        self.total, self.n, self.desc, self.unit, self.disable = total, initial, desc, unit, disable
        self.postfix: dict[str, str] = {}
        self.every = max(1, total // 10)
        self.started = time.monotonic()
        self.bar = None
        if not disable and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and (self.n // self.every > before // self.every or self.n >= self.total):
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        percent = 100 * self.n // max(self.total, 1)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({percent} %){extra}, {clock}", file=self.stream)
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_library_bars(stream=None) -> None:
    """Where `stream` (stderr) is not a terminal, turn off the libraries' own bars (diffusers' "Loading pipeline
    components", transformers' "Loading weights", the hub's downloads): each would be one carriage-return line."""
    if _is_terminal(stream or sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
