"""The `import-lora` flow: a LoRA file from another trainer (for a two-expert model such as Wan 2.2 A14B, one per
expert) -> a vidtune run folder laid out as a trained run's (diffusers adapter files, their ComfyUI files,
train_job.json) -> the same evaluation and registry gate as a trained run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from vidtune.flows.evaluate import EvaluateParams, EvaluationParams, RegisterParams, RegistryParams, evaluate, register
from vidtune.flows.gpu import GpuSlotParams, gpu_slot
from vidtune.flows.names import run_name
from vidtune.tasks.evaluate_tasks import load_clip
from vidtune.tasks.files import sha256_of
from vidtune.tasks.finetune_tasks import check_dataset_task, resolve_family_task
from vidtune.training.data import Holdout
from vidtune.training.families import get_family, model_index
from vidtune.training.layout import RunLayout
from vidtune.training.lora_import import check_expert_files
from vidtune.training.tracking import default_tracking_uri, vidtune_home


class ImportLoraParams(GpuSlotParams):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        description="The LoRA file: .safetensors (diffusers, diffusion_model.* or kohya lora_unet_* keys). For a "
        "two-expert model (Wan 2.2 A14B) the high-noise expert's (transformer); alone, it adapts that expert only "
        "and the low-noise one stays the base model's (a low-noise LoRA imports as file_2, beside its high-noise file)."
    )
    file_2: str | None = Field(
        None,
        description="The low-noise expert's LoRA (transformer_2) of a two-expert model (Wan 2.2 A14B: the "
        "low_noise file of musubi-tuner, ai-toolkit or ComfyUI), in any format file takes; imported into the same "
        "run as a trained two-expert run's second file. Refused for a model with one denoiser.",
    )
    model: str = Field(description="Its base model: a local diffusers folder or a hub id.")
    family: str | None = Field(None, description="Model family; default: detected from the model's model_index.json.")
    data: str | None = Field(
        None,
        description="A curated dataset (vidtune curate OUTPUT) for the held-out loss; without it: sample metrics only.",
    )
    holdout_clips: int = Field(
        8,
        ge=1,
        description="About how many of the dataset's clips the held-out loss averages over: whole sources, picked "
        "as finetune picks them, so a run's LoRA and its import are measured on the same clips.",
    )
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
    source_format: str  # per file, joined with " + " when two experts' files differ
    converter: str
    rank: int
    modules: int  # all experts' together
    experts: list[str]  # the pipeline attributes that received a LoRA


@task(name="convert-lora", cache_policy=NO_CACHE)
def convert_lora_task(
    params: ImportLoraParams, family_name: str, out: Path, dataset, digests: list[str]
) -> ImportedRun:
    """Read the file(s), convert them to the base model's diffusers keys, load them, and write the run folder."""
    import torch

    from vidtune.training.data import parse_bucket_key
    from vidtune.training.job import TrainJob
    from vidtune.training.lora_import import (
        expert_files,
        import_expert_loras,
        imported_experts,
        save_imported_adapter,
        source_record,
    )
    from vidtune.training.params import TrainParams

    family = get_family(family_name)
    pipe = family.load_pipeline(params.model, dtype=torch.float32, **dict.fromkeys(family.text_encoders))
    files = expert_files(family.denoiser_name, params.file, params.file_2)
    imported = import_expert_loras(family, pipe, files)
    info = {"base_model": params.model, "family": family.name, "training_type": "lora"}
    layout = RunLayout(out)
    save_imported_adapter(family, pipe, imported, layout.adapter, info | source_record(files, imported, digests))
    rank = max(lora.rank for lora in imported.values())
    sizes = [parse_bucket_key(key) for key in (dataset.buckets if dataset else {})]
    holdout = dataset.holdout(params.holdout_clips) if dataset else Holdout([])  # as a finetune run holds out
    job = TrainJob(
        model=params.model,
        out=str(out),
        family=family.name,
        data_source="shards",
        tracking_uri=params.tracking_uri or default_tracking_uri(),
        shards=dataset.shards if dataset else [],
        frame_buckets=params.frame_buckets or list(family.frame_buckets),
        sample_size=min(sizes) if sizes else (family.frame_buckets[-1], 480, 832),
        params=TrainParams(training_type="lora", rank=rank, max_steps=1, experts=imported_experts(pipe, imported)),
        holdout_clip_ids=holdout.clip_ids,
        holdout_note=holdout.note,
        tags={
            "imported_from": str(Path(params.file).expanduser().resolve()),
            **({"data": str(Path(params.data).resolve())} if params.data else {}),
        },
    )
    job.write()
    return ImportedRun(
        out=str(out),
        source_format=" + ".join(dict.fromkeys(lora.source_format for lora in imported.values())),
        converter=" + ".join(dict.fromkeys(lora.converter for lora in imported.values())),
        rank=rank,
        modules=sum(lora.modules for lora in imported.values()),
        experts=list(imported),
    )


def default_out(params: ImportLoraParams, digests: list[str]) -> Path:
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return vidtune_home() / "imports" / f"{params.registry.name}-{digest[:12]}"


@flow(
    name="import-lora",
    flow_run_name=run_name("import-lora", ("params", "registry", "name"), default="vidtune-style"),
    log_prints=True,
    validate_parameters=True,
)
def import_lora(params: ImportLoraParams) -> dict:
    """Another trainer's LoRA file (or a two-expert model's two) in; an evaluated (base vs adapted) and registered
    version out."""
    logger = get_run_logger()
    sources = [path for path in (params.file, params.file_2) if path is not None]
    for setting, path in zip(("file", "file_2"), sources):
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{setting}: {path} does not exist")
    family = resolve_family_task(params.model, params.family)
    get_family(family).check_model(params.model)  # e.g. wan-i2v named on a text-to-video Wan: said before loading
    check_expert_files(params.file, params.file_2, model_index(params.model), params.model)
    if params.evaluation.clip_model:  # loaded now (on the CPU), named as typed: a failed download stops nothing later
        load_clip(params.evaluation.clip_model, params.evaluation.clip_pretrained, prefix="evaluation.")

    buckets = params.frame_buckets or list(get_family(family).frame_buckets)
    dataset = check_dataset_task(params.data, buckets, family, "frame_buckets") if params.data else None
    digests = []
    for path in sources:  # once: the run folder's name and the sources' record
        with open(Path(path).expanduser(), "rb") as handle:
            digests.append(sha256_of(handle))
    out = Path(params.out).expanduser().resolve() if params.out else default_out(params, digests)
    with gpu_slot(params.gpu_limit):
        imported = convert_lora_task(params, family, out, dataset, digests)
        logger.info(
            "%s-format LoRA (rank %d, %d modules of %s) converted by %s' converter into %s",
            imported.source_format,
            imported.rank,
            imported.modules,
            " and ".join(imported.experts),
            imported.converter,
            out,
        )
        metrics = evaluate(str(out), EvaluateParams(**params.evaluation.model_dump(), gpu_limit=None))
    registration = None
    if params.run_registration:
        registry = RegisterParams(**params.registry.model_dump(), tracking_uri=params.tracking_uri)
        registration = register(str(out), registry)
    return {**imported.model_dump(), "metrics": metrics, "registration": registration}
