"""The deployments of `prefect.yaml`: served from one process (`vidtune serve`), and run with a preset plus
changes (`vidtune run`). `prefect deploy --all` reads the same file for a work-pool setup."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from vidtune.flows.config import ParamError, deep_merge, format_validation_error, parse_overrides

PROJECT_FILE = "prefect.yaml"


def find_project_file(path: str | Path | None = None) -> Path:
    """`path`, else ./prefect.yaml, else the one beside the installed flows package (a clone or editable install)."""
    candidates = (
        [Path(path)] if path else [Path.cwd() / PROJECT_FILE, Path(__file__).resolve().parent.parent / PROJECT_FILE]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {PROJECT_FILE} at {' or '.join(map(str, candidates))}; pass --file PATH")


def load_deployments(path: Path) -> list[dict]:
    """The `deployments:` entries (YAML anchors from `definitions:` already resolved)."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def parameter_models(flow) -> dict[str, type[BaseModel]]:
    """The flow's parameters that are pydantic models ({"params": FinetuneParams}): the UI forms."""
    models = {}
    for name, annotation in typing.get_type_hints(flow.fn).items():  # the flows' annotations are strings
        for candidate in (annotation, *typing.get_args(annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                models[name] = candidate
    return models


def validate_flow_parameters(flow, parameters: dict) -> None:
    """Check `parameters` against the flow: unknown names, and each pydantic parameter against its model, with
    errors naming the field (what the flow itself would reject, said before a run is created)."""
    known = set(inspect.signature(flow.fn).parameters)
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ParamError(f"{flow.name} has no parameter {', '.join(unknown)} (it takes {', '.join(sorted(known))})")
    for name, model in parameter_models(flow).items():
        if parameters.get(name) is None:
            continue
        try:  # checks of this machine's hardware (fp16 needs a GPU) are the worker's to make
            model.model_validate(parameters[name], context={"remote": True})
        except ValidationError as exc:
            raise ParamError(format_validation_error(exc, section=name)) from None


def serve_project(path: Path, only: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the file's deployments from this process: Prefect starts each flow run in a subprocess here."""
    from prefect import serve
    from prefect.deployments.runner import EntrypointType

    deployments = []
    for entry in load_deployments(path):
        flow = load_flow(entry["entrypoint"])
        if only and f"{flow.name}/{entry['name']}" not in only:
            continue
        validate_flow_parameters(flow, entry.get("parameters") or {})
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                parameters=entry.get("parameters"),
                description=entry.get("description"),
                tags=entry.get("tags"),
                entrypoint_type=EntrypointType.MODULE_PATH,  # runs import the installed package
            )
        )
    if not deployments:
        raise ParamError(f"no deployment of {path} matches {only}")
    serve(*deployments, limit=limit)


def merge_run_parameters(stored: dict, sets: list[str], flow_parameters: set[str]) -> dict:
    """A deployment's stored parameters with `--set key=value` changes merged in key by key. Keys are fields of
    the flow's `params` (max_steps, curate.input) unless they name another flow parameter (evaluate's `run`)."""
    changes = parse_overrides(sets)
    changes = deep_merge(changes, changes.pop("params", {}))  # `params.max_steps` means `max_steps`
    top = {key: changes.pop(key) for key in list(changes) if key in flow_parameters - {"params"}}
    if changes:
        top["params"] = changes
    return deep_merge(stored, top)


def run_with_overrides(name: str, sets: list[str], watch: bool, timeout_s: float | None = None):
    """Start a run of deployment `name` (FLOW/DEPLOYMENT) with its preset plus `sets`, refused before the run
    is created when a key or value is wrong. Returns the flow run (finished when `watch`)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
    flow = load_flow(deployment.entrypoint)
    parameters = merge_run_parameters(deployment.parameters or {}, sets, set(inspect.signature(flow.fn).parameters))
    validate_flow_parameters(flow, parameters)
    return run_deployment(name, parameters=parameters, timeout=timeout_s if watch else 0)
