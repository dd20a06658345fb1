"""The `import-lora` flow: a LoRA file from another trainer -> a vidtune run folder (diffusers adapter, its ComfyUI
file, train_job.json) -> the same evaluation and registry gate as a trained run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from vidtune.flows.evaluate import EvaluateParams, EvaluationParams, RegisterParams, RegistryParams, evaluate, register
from vidtune.flows.gpu import GpuSlotParams, gpu_slot
from vidtune.flows.names import run_name
from vidtune.tasks.files import sha256_of
from vidtune.tasks.finetune_tasks import check_dataset_task, resolve_family_task
from vidtune.training.families import get_family
from vidtune.training.layout import RunLayout
from vidtune.training.tracking import default_tracking_uri, vidtune_home


class ImportLoraParams(GpuSlotParams):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        description="The LoRA file: .safetensors (diffusers, diffusion_model.* or kohya lora_unet_* keys)."
    )
    model: str = Field(description="Its base model: a local diffusers folder or a hub id.")
    family: str | None = Field(None, description="Model family; default: detected from the model's model_index.json.")
    data: str | None = Field(
        None,
        description="A curated dataset (vidtune curate OUTPUT) for the held-out loss; without it: sample metrics only.",
    )
    holdout_clips: int = Field(8, ge=1, description="How many of the dataset's clips the held-out loss averages over.")
    frame_buckets: list[int] | None = Field(
        None, description="Clip lengths the held-out loss reads the clips at; default: the family's."
    )
    out: str | None = Field(None, description="Run folder; default: $VIDTUNE_HOME/imports/<name>-<file digest>.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///$VIDTUNE_HOME/mlflow.db."
    )
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    run_registration: bool = Field(True, description="Register the evaluated adapter (false: evaluate only).")


class ImportedRun(BaseModel):
    out: str
    source_format: str
    converter: str
    rank: int
    modules: int


@task(name="convert-lora", cache_policy=NO_CACHE)
def convert_lora_task(params: ImportLoraParams, family_name: str, out: Path, dataset, digest: str) -> ImportedRun:
    """Read the file, convert it to the base model's diffusers keys, load it, and write the run folder."""
    import torch

    from vidtune.training.adapters import (
        COMFYUI_FILE,
        comfyui_export,
        export_comfyui,
        lora_modules_of,
        save_lora_adapter,
    )
    from vidtune.training.data import parse_bucket_key
    from vidtune.training.lora_import import import_lora, read_lora_file
    from vidtune.training.params import TrainParams
    from vidtune.training.trainer import TrainJob

    family = get_family(family_name)
    pipe = family.load_pipeline(params.model, dtype=torch.float32, **dict.fromkeys(family.text_encoders))
    imported = import_lora(family, pipe, read_lora_file(params.file))
    pipe.load_lora_weights(imported.state, adapter_name="default")
    denoiser = getattr(pipe, family.denoiser_name)
    source = str(Path(params.file).expanduser().resolve())
    info = {
        "base_model": params.model,
        "family": family.name,
        "training_type": "lora",
        "imported_from": source,
        "source_sha256": digest,
        "source_format": imported.source_format,
        "converter": imported.converter,
    }
    layout = RunLayout(out)
    save_lora_adapter(family, pipe, {family.denoiser_name: denoiser}, layout.adapter, info)
    keys = comfyui_export(family, None)
    if keys is not None and all(keys.target(m) is not None for m in lora_modules_of(denoiser)):
        export_comfyui(family, denoiser, layout.adapter / COMFYUI_FILE)
    sizes = [parse_bucket_key(key) for key in (dataset.buckets if dataset else {})]
    job = TrainJob(
        model=params.model,
        out=str(out),
        family=family.name,
        data_source="shards",
        tracking_uri=params.tracking_uri or default_tracking_uri(),
        shards=dataset.shards if dataset else [],
        frame_buckets=params.frame_buckets or list(family.frame_buckets),
        sample_size=min(sizes) if sizes else (family.frame_buckets[-1], 480, 832),
        params=TrainParams(training_type="lora", rank=imported.rank, max_steps=1),
        holdout_clip_ids=dataset.fitting_ids[: params.holdout_clips] if dataset else [],
        tags={"imported_from": source, **({"data": str(Path(params.data).resolve())} if params.data else {})},
    )
    layout.write_train_job(job)
    return ImportedRun(
        out=str(out),
        source_format=imported.source_format,
        converter=imported.converter,
        rank=imported.rank,
        modules=imported.modules,
    )


def default_out(params: ImportLoraParams, digest: str) -> Path:
    return vidtune_home() / "imports" / f"{params.registry.name}-{digest[:12]}"


@flow(
    name="import-lora",
    flow_run_name=run_name("import-lora", ("params", "registry", "name"), default="vidtune-style"),
    log_prints=True,
    validate_parameters=True,
)
def import_lora(params: ImportLoraParams) -> dict:
    """Another trainer's LoRA file in; an evaluated (base vs adapted) and registered version out."""
    logger = get_run_logger()
    if not Path(params.file).expanduser().is_file():
        raise FileNotFoundError(f"file: {params.file} does not exist")
    family = resolve_family_task(params.model, params.family)

    buckets = params.frame_buckets or list(get_family(family).frame_buckets)
    dataset = check_dataset_task(params.data, buckets, family) if params.data else None
    with open(Path(params.file).expanduser(), "rb") as handle:  # once: the run folder's name and the source's record
        digest = sha256_of(handle)
    out = Path(params.out).expanduser().resolve() if params.out else default_out(params, digest)
    with gpu_slot(params.gpu_limit):
        imported = convert_lora_task(params, family, out, dataset, digest)
        logger.info(
            "%s-format LoRA (rank %d, %d modules) converted by %s' converter into %s",
            imported.source_format,
            imported.rank,
            imported.modules,
            imported.converter,
            out,
        )
        metrics = evaluate(str(out), EvaluateParams(**params.evaluation.model_dump(), gpu_limit=None))
    registration = None
    if params.run_registration:
        registry = RegisterParams(**params.registry.model_dump(), tracking_uri=params.tracking_uri)
        registration = register(str(out), registry)
    return {**imported.model_dump(), "metrics": metrics, "registration": registration}
