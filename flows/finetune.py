"""The `finetune` flow: curated shards -> (latent cache) -> LoRA or full fine-tuning -> adapter + MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import Field, field_validator

from flows.evaluate import EvaluationParams, RegistryParams, evaluate, register
from tasks.finetune_tasks import (
    check_dataset_task,
    frame_buckets,
    precompute_task,
    resolve_family_task,
    train_task,
)
from training.cache import PrecomputeParams
from training.data import cache_shards, parse_bucket_key
from training.families import get_family
from training.files import write_json_atomic
from training.params import TrainParams
from training.tracking import default_tracking_uri
from training.trainer import TrainJob


class FinetuneParams(TrainParams):
    """Everything `vidtune finetune` takes (the trainer's parameters plus data, model and outputs): the Prefect
    UI form, the YAML `--config` schema and the `--set` target."""

    data: str = Field(description="Curated dataset folder (the OUTPUT of `vidtune curate`).")
    model: str = Field(description="Base model: a local diffusers folder or a hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers).")
    out: str = Field(description="Run folder: adapter/ (or model/), checkpoints/, samples/.")
    family: str | None = Field(None, description="Model family; default: detected from the model's model_index.json.")
    data_source: Literal["cache", "shards"] = Field("cache", description="cache: train on precomputed latents; shards: encode clips every step.")
    cache_dir: str | None = Field(None, description="Latent cache root; default: DATA/latent_cache.")
    precompute: PrecomputeParams = Field(default_factory=PrecomputeParams)
    num_processes: int = Field(1, ge=1, le=1024, description="Training processes (accelerate launch; one per GPU).")
    experiment: str = Field("vidtune", description="MLflow experiment.")
    run_name: str | None = Field(None, description="MLflow run name; default: MLflow's.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///$VIDTUNE_HOME/mlflow.db.")
    export_comfyui: bool = Field(False, description="Also write adapter/comfyui_lora.safetensors keyed for ComfyUI (wan).")
    holdout_clips: int = Field(2, ge=0, description="Clips kept out of training for the held-out validation loss.")
    run_evaluation: bool = Field(True, description="Evaluate base vs adapted after training (the evaluate flow).")
    run_registration: bool = Field(True, description="Register the result in MLflow after evaluation (the register flow).")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)

    @field_validator("data", "model", "out")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("model")
    @classmethod
    def _absolute_if_local(cls, value: str) -> str:
        """A local folder is stored absolute: evaluate, register and generate may run from elsewhere."""
        local = Path(value).expanduser()
        return str(local.resolve()) if local.exists() else value

    def train_params(self) -> TrainParams:
        return TrainParams.model_validate(self.model_dump(include=set(TrainParams.model_fields)))


def _holdout(params: FinetuneParams, dataset) -> list[str]:
    """The held-out clips: chosen once per run; a resumed run keeps the ones it started with (the data may have grown)."""
    previous = Path(params.out).expanduser() / "train_job.json"
    if params.resume is not None and previous.is_file():
        return TrainJob.model_validate_json(previous.read_text()).holdout_clip_ids
    return dataset.holdout(params.holdout_clips)


@flow(name="finetune", log_prints=True, validate_parameters=True)
def finetune(params: FinetuneParams) -> dict:
    """Curated clips in, a trained adapter out: check data, precompute latents, train."""
    logger = get_run_logger()
    family = get_family(resolve_family_task(params.model, params.family))
    if params.export_comfyui and not hasattr(family, "comfyui_renames"):
        raise ValueError(f"export_comfyui: no ComfyUI key mapping for {family.name} yet (available: wan)")
    buckets = frame_buckets(family, params.precompute)
    dataset = check_dataset_task(params.data, buckets, family.name)  # before any model is loaded

    shards = dataset.shards
    if params.data_source == "cache":
        cache_root = Path(params.cache_dir or Path(params.data) / "latent_cache")
        cache = precompute_task(dataset.shards, family.name, params.model, cache_root, params.precompute)
        shards = cache_shards(cache.cache_dir, set(dataset.buckets))
    sample_size = min(parse_bucket_key(key) for key in dataset.buckets)  # validation default: the shortest bucket

    job = TrainJob(
        model=params.model, family=family.name, out=str(Path(params.out).expanduser().resolve()), data_source=params.data_source,
        shards=shards, frame_buckets=buckets, sample_size=sample_size, params=params.train_params(),
        tracking_uri=params.tracking_uri or default_tracking_uri(), experiment=params.experiment, run_name=params.run_name,
        export_comfyui=params.export_comfyui, holdout_clip_ids=_holdout(params, dataset),
        tags={"data": str(Path(params.data).resolve())},
    )  # fmt: skip
    write_json_atomic(Path(job.out) / "train_job.json", job.model_dump(mode="json"))  # evaluate/register read it
    result = train_task(job, params.num_processes)
    logger.info("trained %d steps, final loss %.4f; weights at %s", result.steps, result.losses[-1], result.weights)

    metrics = evaluate(job.out, params.evaluation) if params.run_evaluation else None
    registration = None
    if params.run_registration:
        registry = params.registry.model_copy(update={"tracking_uri": params.registry.tracking_uri or job.tracking_uri})
        registration = register(job.out, registry)  # an unreachable MLflow: RegistryError says how to register later
    return {
        "metrics": metrics, "registration": registration,
        "family": family.name, "clips": dataset.clips, "buckets": dict(dataset.buckets), "steps": result.steps,
        "final_loss": result.losses[-1], "losses": result.losses, "weights": str(result.weights), "out": str(result.out),
        "mlflow_run_id": result.mlflow_run_id, "tracking_uri": job.tracking_uri, "samples_per_s": result.samples_per_s,
        "peak_memory_mb": result.peak_memory_mb,
    }  # fmt: skip

