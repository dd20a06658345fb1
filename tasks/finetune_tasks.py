"""Prefect tasks of the `finetune` flow: check the data, fill the latent cache, train (in this process, or in
several under `accelerate launch`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from training.cache import (
    DEFAULT_FRAME_BUCKETS,
    PrecomputeParams,
    PrecomputeResult,
    precompute,
)
from training.data import DatasetSummary, summarize_dataset
from training.families import ModelFamily, detect_family, get_family
from training.files import write_json_atomic
from training.launch import ERROR_FILE, RESULT_FILE, raise_launch_error
from training.trainer import TrainJob, TrainResult, train


def frame_buckets(family: ModelFamily, params: PrecomputeParams) -> list[int]:
    return sorted(b for b in (params.frame_buckets or DEFAULT_FRAME_BUCKETS[family.name]) if family.valid_num_frames(b))


@task(name="resolve-family", cache_policy=NO_CACHE)
def resolve_family_task(model: str, family: str | None) -> str:
    return get_family(family).name if family else detect_family(model).name


@task(name="check-dataset", cache_policy=NO_CACHE)
def check_dataset_task(data: str, buckets: list[int], family: str) -> DatasetSummary:
    summary = summarize_dataset(data, buckets, family)
    logger = get_run_logger()
    logger.info("%d clips; training buckets (frames x h x w): %s", summary.clips, dict(summary.buckets))
    if summary.too_short:
        logger.info("%d clips are shorter than every bucket (%s frames) and are left out", len(summary.too_short), buckets)
    return summary


@task(name="precompute-latents", cache_policy=NO_CACHE)
def precompute_task(shards: list[str], family_name: str, model: str, cache_root: Path, params: PrecomputeParams) -> PrecomputeResult:
    """Encode clips not cached yet with the model's VAE and text encoder (on the GPU when there is one)."""
    family = get_family(family_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    pipe = family.load_pipeline(model, dtype=dtype).to(device)
    result = precompute(shards, family, pipe, model, cache_root, params)
    get_run_logger().info("latent cache %s: %d clips encoded, %d reused", result.cache_dir, result.encoded, result.reused)
    return result


def accelerate_command(job_file: Path, num_processes: int) -> list[str]:
    """`accelerate launch` for `num_processes` processes. Without a GPU it uses accelerate's torchrun launcher
    (`--multi_gpu`): its `--cpu` launcher starts one process unless MPI is installed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip  (precision is the trainer's parameter)
    if num_processes > 1:
        command += ["--multi_gpu"]
    return command + ["-m", "training.launch", str(job_file)]


@task(name="train", cache_policy=NO_CACHE)
def train_task(job: TrainJob, num_processes: int) -> TrainResult:
    if num_processes == 1:
        return train(job)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "train_job.json"
    write_json_atomic(job_file, job.model_dump(mode="json"))
    for stale in (RESULT_FILE, ERROR_FILE):
        (out / stale).unlink(missing_ok=True)
    completed = subprocess.run(accelerate_command(job_file, num_processes), env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    if completed.returncode != 0:
        raise_launch_error(out, f"training under accelerate launch ({num_processes} processes) exited with {completed.returncode}")
    return TrainResult.from_json(out / RESULT_FILE)

