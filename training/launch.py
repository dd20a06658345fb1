"""Entry point for multi-process training: `accelerate launch [--num_processes N] -m vidtune.training.launch JOB.json`.

The `finetune` flow writes JOB.json (a `TrainJob`) and starts this under accelerate; the main process writes
the result next to the run's outputs as `train_result.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vidtune.training.data import DatasetError
from vidtune.training.files import write_json_atomic
from vidtune.training.job import TrainJob
from vidtune.training.layout import RunLayout
from vidtune.training.trainer import CUDA_ALLOC_CONF, StepFailed, TrainingDiverged, TrainResult, train

# Errors that explain themselves (bad data, diverged loss, bad settings): carried to the launching process.
EXPLAINED = {cls.__name__: cls for cls in (TrainingDiverged, StepFailed, DatasetError, ValueError)}


def raise_launch_error(out: Path, fallback: str) -> None:
    """Re-raise in the launching process what failed under accelerate, with its message."""
    error_file = RunLayout(out).error
    if error_file.is_file():
        error = json.loads(error_file.read_text())
        raise EXPLAINED.get(error["type"], RuntimeError)(error["message"])
    raise RuntimeError(f"{fallback}; see its output above")


def read_progress(out: Path) -> int:
    """The last optimizer step the main process reported (0 before the first)."""
    try:
        return json.loads(RunLayout(out).progress.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def write_progress(out: Path):
    """An `on_step` callback recording the main process's step in RUN/train_progress.json (a tiny atomic write per step)."""
    progress = RunLayout(out).progress
    return lambda step, loss: write_json_atomic(progress, {"step": step, "loss": loss})


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


def launch_accelerate(job: TrainJob, num_processes: int, report) -> TrainResult:
    """`accelerate launch` on RUN/train_job.json (written by the flow), telling `report` each step the main process
    reaches; the child is stopped if the caller is interrupted or cancelled."""
    out = Path(job.out)
    layout = RunLayout(out)
    for stale in (layout.result, layout.error, layout.progress):
        stale.unlink(missing_ok=True)
    with subprocess.Popen(
        accelerate_command(layout.train_job, num_processes),
        env={"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF, **os.environ, "PYTHONUNBUFFERED": "1"},
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vidtune.training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="TrainJob JSON written by the finetune flow")
    job = TrainJob.model_validate_json(parser.parse_args(argv).job.read_text())
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(job, on_step=write_progress(Path(job.out)) if main_process else None)
    except tuple(EXPLAINED.values()) as exc:
        if main_process or (isinstance(exc, StepFailed) and not exc.together):  # a rank that failed alone says so
            write_json_atomic(RunLayout(Path(job.out)).error, {"type": type(exc).__name__, "message": str(exc)})
        raise SystemExit(1) from exc
    if main_process:
        write_json_atomic(RunLayout(Path(job.out)).result, dataclasses.asdict(result))


if __name__ == "__main__":
    main()
