"""MLflow tracking with explicit locations: `MLFLOW_TRACKING_URI` when set, else a SQLite database and an
artifact folder under `VIDTUNE_HOME` (MLflow's own default would scatter `./mlruns` wherever a run starts)."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def vidtune_home() -> Path:
    return Path(os.environ.get("VIDTUNE_HOME", "~/.vidtune")).expanduser()


def default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = vidtune_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


_ENV_LOCK = threading.Lock()


def point_mlflow_at(uri: str) -> None:
    """MLflow's fluent API (`mlflow.start_run`, `get_model_info`, ...) pointed at `uri`, without the side effect of
    `mlflow.set_tracking_uri` exporting MLFLOW_TRACKING_URI, which later `default_tracking_uri()` calls and child
    processes would otherwise inherit (and another thread's registration could leave behind)."""
    import mlflow

    with _ENV_LOCK:
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


def default_artifact_location(experiment: str) -> str | None:
    """Where a new experiment keeps artifacts; None lets a remote tracking server decide."""
    if os.environ.get("MLFLOW_TRACKING_URI", "sqlite:").split(":", 1)[0] not in ("sqlite", "file"):
        return None
    return (vidtune_home() / "mlartifacts" / experiment).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(name))


class RunTracker:
    """One MLflow run, written only by the main process; resumable by run id. If MLflow cannot be reached, training
    goes on untracked (a warning says so) and the run can be registered later with `vidtune register`."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str | None, run_id: str | None = None, active: bool = True
    ):
        self.active, self.uri, self.run_id = active, tracking_uri, run_id
        self.client = MlflowClient(tracking_uri) if active else None
        if active:
            self._safely(self._start, experiment, run_name)

    def _start(self, experiment: str, run_name: str | None) -> None:
        if self.run_id is None:
            run = self.client.create_run(
                experiment_id(self.client, experiment), run_name=run_name, tags={"vidtune.stage": "finetune"}
            )
            self.run_id = run.info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _safely(self, call, *args) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never cost a training run
            self.active = False
            warnings.warn(
                f"MLflow at {self.uri} failed ({type(exc).__name__}: {str(exc)[:160]}); training continues without tracking",
                stacklevel=3,
            )

    def log_params(self, params: dict) -> None:
        if self.active:
            flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(flat), 100):  # MLflow's batch limit
                self._safely(self.client.log_batch, self.run_id, [], flat[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            now = int(time.time() * 1000)
            self._safely(
                self.client.log_batch, self.run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()]
            )

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        if self.active:
            self._safely(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_dataset(self, data: Path, context: str = "training") -> None:
        """The curated dataset as the run's MLflow input (lineage: the registry shows which data made which
        version): its kept clips from `manifest.parquet` (MLflow digests them and counts the rows), the folder as
        the source."""
        if self.active:
            self._safely(log_dataset, self.client, self.run_id, Path(data), context)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._safely(self.client.set_terminated, self.run_id, status)


def log_dataset(client: MlflowClient, run_id: str, data: Path, context: str) -> None:
    """A curated dataset as an MLflow input of `run_id`: its kept clips from `manifest.parquet` (MLflow digests them
    and counts the rows), the folder as the source; nothing when the folder has no manifest."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    if not (Path(data) / "manifest.parquet").is_file():
        return
    manifest = pd.read_parquet(Path(data) / "manifest.parquet")
    kept = manifest[(manifest["status"] == "kept") & manifest["clip_id"].notna()].reset_index(drop=True)
    columns = [c for c in ("clip_id", "source", "source_sha256", "caption") if c in kept.columns]
    dataset = mlflow.data.from_pandas(kept[columns], source=str(Path(data).resolve()), name=Path(data).name)
    client.log_inputs(
        run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    )


def flatten(params: dict, prefix: str = "") -> dict:
    """{"validation": {"every": 5}} -> {"validation.every": 5} for MLflow params."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
