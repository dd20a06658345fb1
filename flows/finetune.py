"""The `finetune` flow: (raw videos -> curate subflow ->) curated shards -> latent cache -> LoRA or full fine-tuning
-> adapter + MLflow run -> evaluate and register subflows."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import Field, field_validator, model_validator

from vidtune.flows.curate import CurateParams, curate
from vidtune.flows.evaluate import EvaluateParams, EvaluationParams, RegisterParams, RegistryParams, evaluate, register
from vidtune.flows.gpu import GpuSlotParams, gpu_slot
from vidtune.flows.names import run_name
from vidtune.tasks.captions import prompt_with_trigger
from vidtune.tasks.evaluate_tasks import load_clip
from vidtune.tasks.finetune_tasks import (
    check_dataset_task,
    precompute_task,
    publish_summary_task,
    resolve_family_task,
    train_task,
)
from vidtune.tasks.output import dataset_trigger
from vidtune.training.adapters import comfyui_export
from vidtune.training.cache import PrecomputeParams, frame_buckets
from vidtune.training.data import (
    Holdout,
    cache_shards,
    clip_repeats,
    combined_repeats,
    parse_bucket_key,
    still_repeats,
    validation_size,
)
from vidtune.training.experts import check_experts
from vidtune.training.families import get_family, model_index
from vidtune.training.families.objectives import check_objective_params
from vidtune.training.job import TrainJob
from vidtune.training.layout import DatasetLayout
from vidtune.training.memory_plan import check_before_training, device_memory
from vidtune.training.params import RunTarget, TrainParams
from vidtune.training.tracking import default_tracking_uri


class FinetuneParams(RunTarget, TrainParams, GpuSlotParams):
    """Everything `vidtune finetune` takes (the trainer's parameters plus data, model and outputs): the Prefect
    UI form, the YAML `--config` schema and the `--set` target."""

    data: str | None = Field(
        None, description="Curated dataset folder (the OUTPUT of `vidtune curate`); default: curate.output."
    )
    curate: CurateParams | None = Field(
        None,
        description="Curate raw videos first (the curate flow runs as a subflow; its output is the data); null: train on existing data.",
    )
    cache_dir: str | None = Field(None, description="Latent cache root; default: DATA/latent_cache.")
    precompute: PrecomputeParams = Field(default_factory=PrecomputeParams)
    num_processes: int = Field(1, ge=1, le=1024, description="Training processes (accelerate launch; one per GPU).")
    holdout_clips: int = Field(
        8,
        ge=0,
        description="Clips kept out of training for the held-out loss: whole sources until at least this many "
        "(training keeps at least half of the clips); with one source, its last clips in time.",
    )
    run_evaluation: bool = Field(True, description="Evaluate base vs adapted after training (the evaluate flow).")
    run_registration: bool = Field(
        True, description="Register the result in MLflow after evaluation (the register flow)."
    )
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    prepare_only: bool = Field(
        False,
        description="Stop after precompute with RUN/train_job.json written, for your own `accelerate launch -m vidtune.training.launch` (several machines).",
    )

    @field_validator("data", "model", "out")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _data_or_curate(self) -> FinetuneParams:
        """`data` is where the clips are: given, or what the curate subflow writes."""
        if self.curate is not None:
            if (
                self.data is not None
                and Path(self.data).expanduser().resolve() != Path(self.curate.output).expanduser().resolve()
            ):
                raise ValueError(
                    f"data ({self.data}) must be curate.output ({self.curate.output}) when curating first; leave data unset"
                )
            self.data = self.curate.output
        if self.data is None:
            raise ValueError(
                "data: give a curated dataset folder, or curate.input and curate.output to curate raw videos first"
            )
        self.data = str(Path(self.data).expanduser())  # the cache, the trigger lookup and the run's tag all read it
        return self

    @field_validator("model")
    @classmethod
    def _absolute_if_local(cls, value: str) -> str:
        """A local folder is stored absolute: evaluate, register and generate may run from elsewhere."""
        local = Path(value).expanduser()
        return str(local.resolve()) if local.exists() else value

    def train_params(self) -> TrainParams:
        return TrainParams.model_validate(self.model_dump(include=set(TrainParams.model_fields)))


def _holdout(params: FinetuneParams, dataset) -> Holdout:
    """The held-out clips: chosen once per run; a resumed run keeps the ones it started with (the data may have grown)."""
    previous = TrainJob.find(Path(params.out).expanduser()) if params.resume is not None else None
    if previous is not None:
        return Holdout(previous.holdout_clip_ids, previous.holdout_note)
    return dataset.holdout(params.holdout_clips)


def _memory_plan(params: FinetuneParams, family, buckets: dict[str, int], logger) -> FinetuneParams:
    """The memory plan against this machine's GPU, logged (a warning naming the recommendation when the estimate
    exceeds the GPU's memory), with `blocks_to_swap: auto` resolved from it. Without a GPU: nothing to compare (and
    auto refused). A plan that cannot be made is a warning: the estimate only advises."""
    device = device_memory()
    if device is None and params.blocks_to_swap != "auto":
        return params
    try:
        check = check_before_training(params.model, family, params, dict(buckets), device, params.data_source)
    except Exception as exc:  # noqa: BLE001 - advice only, unless auto needs it
        if params.blocks_to_swap == "auto":
            raise
        logger.warning("memory plan: not made (%s: %s)", type(exc).__name__, exc)
        return params
    logger.info("%s", check.plan.table())
    if check.warning:
        logger.warning(check.warning)
    return params.model_copy(update={"blocks_to_swap": check.blocks_to_swap})


def _train_params(params: FinetuneParams) -> TrainParams:
    """The trainer's slice, with `{trigger}` in validation prompts replaced by the dataset's trigger word(s)."""
    train_params, trigger = params.train_params(), dataset_trigger(params.data)
    prompts = [prompt_with_trigger(p, trigger) for p in train_params.validation.prompts]
    return train_params.model_copy(
        update={"validation": train_params.validation.model_copy(update={"prompts": prompts})}
    )


# Top-level parameters beside `params`, for the keys people change most: `prefect deployment run finetune/style
# --param max_steps=500 --param input=/data/raw2` works without restating the nested model. Each, when set,
# replaces the nested value it names before validation.
TOP_LEVEL = {
    "input": "curate.input",
    "data": "data",
    "model": "model",
    "out": "out",
    "name": "registry.name",
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "rank": "rank",
}


def with_top_level(params: FinetuneParams, values: dict) -> FinetuneParams:
    """`params` with the top-level parameters that are set written into it, validated again (naming the field)."""
    changes = {key: value for key, value in values.items() if value is not None}
    if not changes:
        return params
    merged = params.model_dump()
    for key, value in changes.items():
        *parents, leaf = TOP_LEVEL[key].split(".")
        target = merged
        for parent in parents:
            if target.get(parent) is None:
                raise ValueError(f"{key}: sets params.{TOP_LEVEL[key]}, but params.{parent} is null")
            target = target[parent]
        target[leaf] = value
    if "input" in changes and "data" not in changes:
        merged["data"] = None  # follows curate.output
    return FinetuneParams.model_validate(merged)


def resume_on_retry(params: FinetuneParams, run_count: int) -> FinetuneParams:
    """A retried flow run (Retry in the UI, or flow retries) continues from its last checkpoint: the attempt that
    failed left them in `out`, and a fresh start would be refused for them."""
    if run_count > 1 and params.resume is None:
        return params.model_copy(update={"resume": "latest"})
    return params


@flow(
    name="finetune",
    flow_run_name=run_name("finetune", ("name",), ("params", "registry", "name"), default="vidtune-style"),
    log_prints=True,
    validate_parameters=True,
)
def finetune(
    params: FinetuneParams,
    input: str | None = None,
    data: str | None = None,
    model: str | None = None,
    out: str | None = None,
    name: str | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    rank: int | None = None,
) -> dict:
    """Curated clips (or raw videos, curated first) in, a trained, evaluated and registered adapter out. The
    top-level parameters, when set, replace the nested ones they name (see TOP_LEVEL)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    top = {"input": input, "data": data, "model": model, "out": out, "name": name}
    params = with_top_level(params, top | {"max_steps": max_steps, "learning_rate": learning_rate, "rank": rank})
    if flow_run.run_count > 1 and params.resume is None:
        logger.info(
            "attempt %d of this flow run: resuming from the latest checkpoint in %s", flow_run.run_count, params.out
        )
    params = resume_on_retry(params, flow_run.run_count)
    family = get_family(resolve_family_task(params.model, params.family))  # a wrong model fails before curation
    family.check_model(params.model)
    comfyui_export(family, params.export_comfyui)  # export_comfyui=true for a family ComfyUI cannot load: refused
    check_objective_params(family.objective_kind, params, family.name)
    family.check_samples_possible(
        params.validation.prompts, params.validation.images, params.run_evaluation, params.holdout_clips
    )
    if params.experts is not None:  # refused for a one-denoiser model, before any data is read
        check_experts(params.experts, model_index(params.model), params.model)
    curated = curate(params.curate) if params.curate is not None else None
    buckets = frame_buckets(family, params.precompute)
    dataset = check_dataset_task(params.data, buckets, family.name)  # before any model is loaded
    for key in dataset.buckets:  # sizes the model cannot take fail here, naming the setting
        family.check_clip_size(params.model, *parse_bucket_key(key))
    params = _memory_plan(params, family, dataset.buckets, logger)  # blocks_to_swap=auto resolved here
    if params.run_evaluation and params.evaluation.clip_model:  # loaded now: a download that fails stops no training
        load_clip(params.evaluation.clip_model, params.evaluation.clip_pretrained, prefix="evaluation.")  # on the CPU

    with gpu_slot(params.gpu_limit):  # one slot from precompute to evaluation: a queued run cannot cut in between
        shards, prompt_cache, train_params = dataset.shards, None, _train_params(params)
        if params.data_source == "cache":
            cache_root = Path(params.cache_dir) if params.cache_dir else DatasetLayout(Path(params.data)).latent_cache
            cache = precompute_task(
                dataset,
                family.name,
                params.model,
                cache_root,
                params.precompute,
                train_params.validation.prompts,
                params.num_processes,  # one encoding process per training process (GPU)
            )
            shards, prompt_cache = cache_shards(cache.cache_dir, set(dataset.buckets)), str(cache.prompts_dir)
        job = _train_job(params, train_params, family.name, dataset, shards, buckets, prompt_cache)
        outline = {
            "curate": curated,
            "family": family.name,
            "clips": dataset.clips,
            "buckets": dict(dataset.buckets),
            "out": job.out,
        }
        if params.prepare_only:
            logger.info(
                "prepared %s/train_job.json; train with: accelerate launch ... -m vidtune.training.launch %s/train_job.json",
                job.out,
                job.out,
            )
            return {**outline, "prepared": True}
        result = train_task(job, params.num_processes)
        logger.info("trained %d steps, final loss %.4f; weights at %s", result.steps, result.losses[-1], result.weights)
        evaluation = EvaluateParams(**params.evaluation.model_dump(), gpu_limit=None)  # this flow's slot covers it
        metrics = evaluate(job.out, evaluation) if params.run_evaluation else None
    registration = None
    if params.run_registration:
        registry = RegisterParams(**params.registry.model_dump(), tracking_uri=job.tracking_uri)
        registration = register(job.out, registry)  # an unreachable MLflow: RegistryError says how to register later
    summary = {
        **outline,
        "metrics": metrics,
        "registration": registration,
        "steps": result.steps,
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "weights": str(result.weights),
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": job.tracking_uri,
        "samples_per_s": result.samples_per_s,
        "peak_memory_mb": result.peak_memory_mb,
        "checkpoint": result.checkpoint,
        "heldout_curve": str(result.heldout_curve) if result.heldout_curve else None,
    }
    publish_summary_task(summary)
    return summary


def _train_job(
    params: FinetuneParams,
    train_params: TrainParams,
    family: str,
    dataset,
    shards: list[str],
    buckets: list[int],
    prompt_cache: str | None,
) -> TrainJob:
    """What the trainer runs, also written to RUN/train_job.json (evaluate, register and accelerate read it)."""
    sample_size, holdout = validation_size(dataset.buckets), _holdout(params, dataset)
    resolved = {
        "family": family,
        "out": str(Path(params.out).expanduser().resolve()),
        "tracking_uri": params.tracking_uri or default_tracking_uri(),
    }
    job = TrainJob(
        **params.model_dump(include=set(RunTarget.model_fields) - set(resolved)),
        **resolved,
        shards=shards,
        frame_buckets=buckets,
        sample_size=sample_size,
        params=train_params,
        prompt_cache=prompt_cache,
        holdout_clip_ids=holdout.clip_ids,
        holdout_note=holdout.note,
        train_clip_ids=[c for c in dataset.fitting_ids if c not in set(holdout.clip_ids)],
        clip_repeats=combined_repeats(
            clip_repeats(train_params.repeats, dataset.source_of),
            still_repeats(train_params.image_fraction, dataset.stills, dataset.fitting_ids),
        ),
        tags={"data": str(Path(params.data).resolve())},
    )
    job.write()
    return job
