"""The `evaluate` and `register` flows: a finished run -> base-vs-adapted metrics -> a registry version, with the
promotion gate deciding `champion`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from vidtune.flows.gpu import GpuSlotParams, gpu_slot
from vidtune.flows.names import run_name
from vidtune.tasks.captions import prompt_with_trigger
from vidtune.tasks.evaluate_tasks import evaluate_task, register_task
from vidtune.tasks.output import dataset_trigger
from vidtune.tasks.scoring import ClipModelParams
from vidtune.training.job import TrainJob
from vidtune.training.layout import RunLayout
from vidtune.training.params import SamplingParams
from vidtune.training.sampling import SampleSettings
from vidtune.training.tracking import default_tracking_uri

DEFAULT_PROMPTS = ["a city street at night", "waves rolling onto a beach"]


class EvaluationParams(SamplingParams, ClipModelParams):
    """What evaluation renders and measures (the CLIP model: the same fields as curation's scores)."""

    prompts: list[str] = Field(
        default_factory=list,
        description="Sample prompts ({trigger}: the dataset's trigger word); default: the run's validation prompts, else two generic ones.",
    )
    draws: int = Field(
        16,
        ge=1,
        description="Noise levels per held-out clip for the held-out loss: a stratified grid over the whole range "
        "with fixed noise, the same for every run and model, so base, adapted and champion pair draw by draw.",
    )
    i3d_path: str | None = Field(
        None, description="I3D TorchScript file for FVD; without it FVD is reported as not computed."
    )


class EvaluateParams(EvaluationParams, GpuSlotParams):
    """The `evaluate` flow's form: evaluation plus the GPU slot it holds. Inside `finetune` the slot is
    finetune's own (one slot from precompute to evaluation), so its `evaluation` section has no `gpu_limit`."""


class RegistryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("vidtune-style", min_length=1, description="Registered model name.")
    clip_tolerance: float = Field(
        0.02, ge=0, description="Largest CLIP-alignment drop below the base that still promotes."
    )
    min_gain: float = Field(
        0.0,
        ge=-1,
        lt=1,
        description="Promote only when the lower bound of the 95% interval of the held-out loss gain (relative: "
        "0.01 = 1% lower loss) over the base, and over the champion, is above this.",
    )


class RegisterParams(RegistryParams):
    """The `register` flow's form: the registry settings plus where MLflow is. Inside `finetune` that is
    finetune's own `tracking_uri`, so its `registry` section has none."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow URI; default: the one the run trained against, else $MLFLOW_TRACKING_URI or sqlite:///$VIDTUNE_HOME/mlflow.db.",
    )


def sample_settings(run: str, params: EvaluationParams) -> SampleSettings:
    job = TrainJob.read(run)
    frames, height, width = job.sample_size
    validation = job.params.validation
    trigger = dataset_trigger(job.tags["data"]) if "data" in job.tags else ""
    prompts = [prompt_with_trigger(p, trigger) for p in params.prompts or validation.prompts or DEFAULT_PROMPTS]
    return SampleSettings(
        prompts=prompts,
        num_frames=params.num_frames or frames,
        height=params.height or height,
        width=params.width or width,
        inference_steps=params.inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        fps=validation.fps,
    )


PROMOTED = "vidtune.model.promoted"


def emit_promoted(registration, run: Path, metrics: dict, tracking_uri: str) -> None:
    """The Prefect event `vidtune.model.promoted` (resource `vidtune.model.<name>`), for automations to react to:
    render samples, deploy, notify."""
    from prefect.events import emit_event

    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    emit_event(
        event=PROMOTED,
        resource={
            "prefect.resource.id": f"vidtune.model.{registration.name}",
            "prefect.resource.name": registration.name,
            "vidtune.version": str(registration.version),
        },
        payload={
            "name": registration.name,
            "version": str(registration.version),
            "model_uri": registration.model_uri,
            "run_dir": str(Path(run).resolve()),
            "aliases": registration.aliases,
            "gate": registration.decision.summary(),
            "metrics": numbers,
            "tracking_uri": tracking_uri,
        },
    )


def _run_tracking_uri(run: Path) -> str | None:
    """The MLflow the run was trained against (its train_job.json), so its version joins that run."""
    job = TrainJob.find(run)
    return job.tracking_uri if job is not None else None


@flow(
    name="evaluate",
    flow_run_name=run_name("evaluate", ("run",), folder=True),
    log_prints=True,
    validate_parameters=True,
)
def evaluate(run: str, params: EvaluateParams | None = None) -> dict:
    """Base vs adapted on fixed prompts and noise; metrics, samples and a contact sheet in RUN/evaluation/."""
    params = params or EvaluateParams()
    settings = sample_settings(run, params)
    with gpu_slot(params.gpu_limit):
        metrics = evaluate_task(run, settings, params.clip_model, params.clip_pretrained, params.i3d_path, params.draws)
    get_run_logger().info(
        "validation loss %s -> %s (base -> adapted)", metrics.get("val_loss_base"), metrics.get("val_loss_adapted")
    )
    return metrics


@flow(
    name="register",
    flow_run_name=run_name("register", ("params", "name"), default="vidtune-style"),
    log_prints=True,
    validate_parameters=True,
)
def register(run: str, params: RegisterParams | None = None) -> dict:
    """Register RUN's weights as a new version (alias challenger); the gate decides whether it becomes champion."""
    params = params or RegisterParams()
    tracking_uri = params.tracking_uri or _run_tracking_uri(Path(run)) or default_tracking_uri()
    registration = register_task(
        str(Path(run).resolve()), params.name, tracking_uri, params.clip_tolerance, params.min_gain
    )
    get_run_logger().info("%s v%s: %s", registration.name, registration.version, registration.decision.summary())
    if registration.decision.promote:
        emit_promoted(registration, Path(run), RunLayout(Path(run)).read_metrics() or {}, tracking_uri)
    return {
        "name": registration.name,
        "version": registration.version,
        "model_uri": registration.model_uri,
        "aliases": registration.aliases,
        "created": registration.created,
        "promoted": registration.decision.promote,
        "gate": registration.decision.summary(),
    }
