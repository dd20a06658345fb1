"""Progress of long stages as a Prefect progress artifact, so the UI shows how far a run is; a no-op outside a
flow or task run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext


@contextmanager
def progress_artifact(
    key: str | None, total: int, description: str, min_interval_s: float = 2.0
) -> Iterator[Callable[[int], None]]:
    """Yields `report(done)`. The artifact (0-100 %) is updated at most every `min_interval_s` seconds, and once more
    at the end with the last count reported, so the API is not called per item. No key: nothing is published."""
    if key is None or total <= 0 or (FlowRunContext.get() is None and TaskRunContext.get() is None):
        yield lambda done: None
        return
    artifact = create_progress_artifact(0.0, key=key, description=description)
    last = {"sent": 0.0, "done": 0, "at": time.monotonic()}

    def report(done: int) -> None:
        last["done"] = done
        if time.monotonic() - last["at"] >= min_interval_s:
            _send(done)

    def _send(done: int) -> None:
        percent = min(100.0, 100.0 * done / total)
        if percent == last["sent"]:
            return
        try:
            update_progress_artifact(artifact, percent)
        except Exception as exc:  # the UI's progress bar is not worth a failed training run
            logging.getLogger(__name__).warning("could not update the progress artifact %r: %s", key, exc)
        last["sent"], last["at"] = percent, time.monotonic()

    try:
        yield report
    finally:
        _send(last["done"])
