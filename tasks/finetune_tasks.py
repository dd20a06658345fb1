"""Prefect tasks of the `finetune` flow: check the data, fill the latent cache, train (in this process, or in
several under `accelerate launch`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vidtune.evaluation.evaluate import metrics_markdown
from vidtune.tasks.manifest import curate_summary_markdown
from vidtune.tasks.progress import progress_artifact
from vidtune.training.cache import PrecomputeParams, PrecomputeResult, precompute
from vidtune.training.data import DatasetSummary, summarize_dataset
from vidtune.training.devices import placement
from vidtune.training.families import detect_family, get_family
from vidtune.training.launch import raise_launch_error, read_progress
from vidtune.training.layout import RunLayout
from vidtune.training.trainer import TrainJob, TrainResult, train


@task(name="resolve-family", cache_policy=NO_CACHE)
def resolve_family_task(model: str, family: str | None) -> str:
    return get_family(family).name if family else detect_family(model).name


@task(name="check-dataset", cache_policy=NO_CACHE)
def check_dataset_task(data: str, buckets: list[int], family: str) -> DatasetSummary:
    summary = summarize_dataset(data, buckets, family)
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
) -> PrecomputeResult:
    """Encode clips not cached yet, and the validation `prompts`, with the model's VAE and text encoder (on the
    GPU when there is one): training then loads neither encoder."""
    family = get_family(family_name)
    device, dtype = placement()
    pipe = family.load_pipeline(model, dtype=dtype).to(device)
    with progress_artifact("precompute-progress", dataset.clips, f"latents for {dataset.clips} clips") as report:
        result = precompute(dataset.shards, family, pipe, model, cache_root, params, on_clip=report, prompts=prompts)
    get_run_logger().info(
        "latent cache %s: %d clips encoded, %d reused", result.cache_dir, result.encoded, result.reused
    )
    return result


def accelerate_command(job_file: Path, num_processes: int) -> list[str]:
    """`accelerate launch` for `num_processes` processes. Without a GPU it uses accelerate's torchrun launcher
    (`--multi_gpu`): its `--cpu` launcher starts one process unless MPI is installed."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]  # precision is the trainer's parameter
    if num_processes > 1:
        command += ["--multi_gpu"]
    return command + ["-m", "vidtune.training.launch", str(job_file)]


@task(name="train", cache_policy=NO_CACHE)
def train_task(job: TrainJob, num_processes: int) -> TrainResult:
    """Train in this process, or in `num_processes` under `accelerate launch`; progress goes to the artifact
    `train-progress` either way (from the trainer's step callback, or from the file the main process writes)."""
    steps = job.params.max_steps
    with progress_artifact("train-progress", steps, f"{steps} optimizer steps of {job.out}") as report:
        if num_processes == 1:
            result = train(job, on_step=lambda step, loss: report(step))
        else:
            result = _launch(job, num_processes, report)
        report(result.steps)  # also when a resumed run had no step left to take
        return result


def _launch(job: TrainJob, num_processes: int, report) -> TrainResult:
    """`accelerate launch` on RUN/train_job.json (written by the flow); the child is stopped if this task is."""
    out = Path(job.out)
    layout = RunLayout(out)
    for stale in (layout.result, layout.error, layout.progress):
        stale.unlink(missing_ok=True)
    with subprocess.Popen(
        accelerate_command(layout.train_job, num_processes), env={**os.environ, "PYTHONUNBUFFERED": "1"}
    ) as process:
        try:
            while process.poll() is None:
                time.sleep(2)
                report(read_progress(out))
        except BaseException:  # cancelled or interrupted: the GPU slot is released, so the training must stop too
            process.terminate()
            raise
    if process.returncode != 0:
        raise_launch_error(
            out, f"training under accelerate launch ({num_processes} processes) exited with {process.returncode}"
        )
    return TrainResult.from_json(layout.result)


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary_task(summary: dict) -> None:
    """The run's outcome as the Prefect artifact `finetune-summary`: training, the metrics table, the gate."""
    create_markdown_artifact(
        finetune_summary_markdown(summary), key="finetune-summary", description=f"finetune: {summary['out']}"
    )


def finetune_summary_markdown(summary: dict) -> str:
    losses = summary["losses"]
    lines = [
        f"**finetune** ({summary['family']}) → `{summary['weights']}`",
        "",
        "| training | |",
        "|---|---|",
        f"| clips | {sum(summary['buckets'].values())} of {summary['clips']} fit buckets {summary['buckets']} |",
        f"| steps | {summary['steps']} |",
        f"| loss | {losses[0]:.4f} (first) → {summary['final_loss']:.4f} (last) |",
        f"| speed | {summary['samples_per_s']:.2f} samples/s, peak memory {summary['peak_memory_mb']:.0f} MB |",
        f"| MLflow run | `{summary['mlflow_run_id']}` at `{summary['tracking_uri']}` |",
    ]
    if summary.get("curate"):  # --raw: the curate subflow ran first
        lines = [curate_summary_markdown(summary["curate"], Path(summary["curate"]["output"])), "", *lines]
    if summary.get("metrics"):
        lines += ["", metrics_markdown(summary["metrics"], Path(summary["out"]))]
    if summary.get("registration"):
        registration = summary["registration"]
        lines += [
            "",
            f"Registered `{registration['model_uri']}` [{', '.join(registration['aliases'])}]: {registration['gate']}",
        ]
    return "\n".join(lines)
