"""Flow run names that say what a run does, e.g. `finetune-vidtune-style-3f2a9c1e` (the registry name and the
run id's first 8 characters), instead of Prefect's random adjective-animal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath


def _lookup(value, path: tuple[str, ...]):
    for key in path:
        if value is None:
            return None
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return value


def run_name(kind: str, *paths: tuple[str, ...], default: str = "run", folder: bool = False) -> Callable[[], str]:
    """A `flow_run_name` callable: `<kind>-<the first of the parameter paths that is set>-<short id>`; with
    `folder`, a path value gives its last part."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        value = next((v for v in (_lookup(parameters, p) for p in paths) if v), None)
        label = PurePath(str(value)).name if folder and value else value
        return f"{kind}-{label or default}-{str(flow_run.id)[:8]}"

    return name
