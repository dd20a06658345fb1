"""Prefect tasks of the `finetune` flow: check the data, fill the latent cache, train (in this process, or in
several under `accelerate launch`, which `vidtune.training.launch` starts)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vidtune.evaluation.report import finetune_summary_markdown
from vidtune.tasks.progress import progress_artifact
from vidtune.training.cache import PrecomputeParams, PrecomputeResult, load_encoders, precompute
from vidtune.training.data import DatasetSummary, summarize_dataset
from vidtune.training.devices import placement
from vidtune.training.families import detect_family, get_family
from vidtune.training.job import TrainJob
from vidtune.training.launch import launch_accelerate
from vidtune.training.precompute_launch import precompute_processes
from vidtune.training.trainer import TrainResult, train


@task(name="resolve-family", cache_policy=NO_CACHE)
def resolve_family_task(model: str, family: str | None) -> str:
    return get_family(family).name if family else detect_family(model).name


@task(name="check-dataset", cache_policy=NO_CACHE)
def check_dataset_task(
    data: str, buckets: list[int], family: str, buckets_setting: str = "precompute.frame_buckets"
) -> DatasetSummary:
    summary = summarize_dataset(data, buckets, family, buckets_setting)
    logger = get_run_logger()
    logger.info("%d clips; training buckets (frames x h x w): %s", summary.clips, dict(summary.buckets))
    if summary.too_short:
        logger.info(
            "%d clips are shorter than every bucket (%s frames) and are left out", len(summary.too_short), buckets
        )
    return summary


@task(name="precompute-latents", cache_policy=NO_CACHE)
def precompute_task(
    dataset: DatasetSummary,
    family_name: str,
    model: str,
    cache_root: Path,
    params: PrecomputeParams,
    prompts: list[str],
    processes: int = 1,
) -> PrecomputeResult:
    """Encode clips not cached yet, and the validation `prompts`, with the model's VAE and text encoder (on the
    GPU when there is one; in `processes` processes, one per GPU, when more than 1): training then loads neither
    encoder."""
    with progress_artifact("precompute-progress", dataset.clips, f"latents for {dataset.clips} clips") as report:
        if processes > 1:
            args = (dataset.shards, family_name, model, cache_root, params, prompts, processes)
            result = precompute_processes(*args, on_clip=report)
        else:
            family = get_family(family_name)
            device, dtype = placement()
            pipe = load_encoders(family, model, dtype, device)  # no denoiser: the 14B ones would not fit beside them
            result = precompute(
                dataset.shards, family, pipe, model, cache_root, params, on_clip=report, prompts=prompts
            )
    get_run_logger().info(
        "latent cache %s: %d clips encoded, %d reused", result.cache_dir, result.encoded, result.reused
    )
    return result


@task(name="train", cache_policy=NO_CACHE)
def train_task(job: TrainJob, num_processes: int) -> TrainResult:
    """Train in this process, or in `num_processes` under `accelerate launch`; progress goes to the artifact
    `train-progress` either way (from the trainer's step callback, or from the file the main process writes)."""
    steps = job.params.max_steps
    with progress_artifact("train-progress", steps, f"{steps} optimizer steps of {job.out}") as report:
        if num_processes == 1:
            result = train(job, on_step=lambda step, loss: report(step))
        else:
            result = launch_accelerate(job, num_processes, report)
        report(result.steps)  # also when a resumed run had no step left to take
        return result


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary_task(summary: dict) -> None:
    """The run's outcome as the Prefect artifact `finetune-summary`: training, the metrics table, the gate."""
    create_markdown_artifact(
        finetune_summary_markdown(summary), key="finetune-summary", description=f"finetune: {summary['out']}"
    )
