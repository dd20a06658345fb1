"""Prefect task wrappers for the curation stages: names for the UI, retries for transient I/O only."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vidtune.tasks.discover import identify_source
from vidtune.tasks.records import Source, SourceResult
from vidtune.tasks.source import SourceSettings, curate_source

# Errors that say something about the input, not the infrastructure: retrying cannot help.
_PERMANENT = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry only network/disk hiccups (timeouts, connection resets, remote-store errors)."""
    try:
        state.result()
    except (TimeoutError, ConnectionError):
        return True
    except OSError as exc:
        return not isinstance(exc, _PERMANENT)
    except Exception:
        return False
    return False


_io_task = dict(
    retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_on_transient_io, cache_policy=NO_CACHE
)


@task(name="identify-source", task_run_name="identify {path}", **_io_task)
def identify_source_task(path: str, download_dir: Path) -> Source:
    return identify_source(path, download_dir)


@task(name="curate-source", task_run_name="curate {source.path}", **_io_task)
def curate_source_task(source: Source, settings: SourceSettings, staging_root: Path) -> SourceResult:
    return curate_source(source, settings, staging_root)
