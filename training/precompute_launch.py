"""Precompute in several processes, one per GPU: `python -m vidtune.training.precompute_launch JOB.json RANK WORLD`.

`precompute_processes` writes JOB.json (a hidden file in the cache root), starts WORLD of these at once and adds up
what they did.
Each loads the VAE and text encoders on its own GPU (the only one it sees; the CPU without one) and encodes the clips whose
id hashes to its rank (`vidtune.training.cache.precompute`), reporting how many it has finished in a
status file beside JOB.json; a process that fails leaves its error there, and the others are stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from vidtune.training.cache import PrecomputeParams, PrecomputeResult, load_encoders, precompute
from vidtune.training.devices import placement
from vidtune.training.files import write_json_atomic

POLL_S = 1.0


def _status_file(job_file: Path, rank: int) -> Path:
    return job_file.with_name(f"{job_file.stem}-{rank}.json")


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def precompute_processes(
    shards: list[str],
    family_name: str,
    model: str,
    cache_root: Path,
    params: PrecomputeParams,
    prompts: list[str],
    processes: int,
    on_clip: Callable[[int], None] | None = None,
) -> PrecomputeResult:
    """`precompute` split over `processes` processes started together; `on_clip(n)`: clips finished by all of them.
    A failing process stops the rest and is raised here with its message (its clips are encoded by the next run)."""
    report = on_clip or (lambda done: None)
    cache_root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".precompute-", suffix=".json", dir=cache_root)  # one per run: runs may share
    os.close(fd)
    job_file = Path(name)
    job = {
        "shards": shards,
        "family": family_name,
        "model": model,
        "cache_root": str(cache_root),
        "params": params.model_dump(),
        "prompts": prompts,
    }
    write_json_atomic(job_file, job)
    status_files = [_status_file(job_file, rank) for rank in range(processes)]
    for path in status_files:
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "vidtune.training.precompute_launch", str(job_file)]
    children = [
        subprocess.Popen([*command, str(rank), str(processes)], env=_environment(rank)) for rank in range(processes)
    ]
    first_failed = None  # the rank that failed on its own (the others are then stopped)
    try:
        while any(child.poll() is None for child in children):
            first_failed = next((r for r, c in enumerate(children) if c.poll() not in (None, 0)), None)
            if first_failed is not None:
                break
            report(sum(_read_status(p).get("done", 0) for p in status_files))
            time.sleep(POLL_S)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
            child.wait()
    statuses = [_read_status(p) for p in status_files]
    for path in (job_file, *status_files):
        path.unlink(missing_ok=True)
    failed = [r for r, (c, s) in enumerate(zip(children, statuses, strict=True)) if c.returncode or "result" not in s]
    if failed:  # the rank that said why, else the one that exited first, over those stopped because of it
        rank = next(
            (r for r in failed if "error" in statuses[r]), first_failed if first_failed is not None else failed[0]
        )
        why = statuses[rank].get("error") or f"exit code {children[rank].returncode}; see its output above"
        raise RuntimeError(f"precompute process {rank} of {processes} failed: {why}")
    total = _added_up([s["result"] for s in statuses])
    report(total.finished)
    return total


def _environment(rank: int) -> dict[str, str]:
    """The process's environment: on a machine with GPUs, only its own GPU visible (rank modulo the GPUs, within
    any CUDA_VISIBLE_DEVICES already set), so nothing it allocates lands on another rank's GPU."""
    env = dict(os.environ)
    if torch.cuda.is_available():
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)].strip()
    return env


def _added_up(results: list[dict]) -> PrecomputeResult:
    total = PrecomputeResult(Path(results[0]["cache_dir"]), Path(results[0]["prompts_dir"]))
    for result in results:
        for name in PrecomputeResult.COUNTS:
            setattr(total, name, getattr(total, name) + result[name])
        total.skipped.update(Counter(result["skipped"]))
    return total


def main(argv: list[str] | None = None) -> None:
    job_file, rank, world = (argv or sys.argv[1:])[:3]
    job_file, rank, world = Path(job_file), int(rank), int(world)
    status = _status_file(job_file, rank)
    job = json.loads(job_file.read_text())
    try:
        from vidtune.training.families import get_family

        family = get_family(job["family"])
        device, dtype = placement()  # its own GPU, the only one it sees (`_environment`)
        pipe = load_encoders(family, job["model"], dtype, device)
        result = precompute(
            job["shards"],
            family,
            pipe,
            job["model"],
            Path(job["cache_root"]),
            PrecomputeParams(**job["params"]),
            on_clip=lambda done: write_json_atomic(status, {"done": done}),
            prompts=job["prompts"],
            rank=rank,
            world=world,
        )
    except Exception as exc:
        write_json_atomic(status, {"error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        sys.exit(1)
    done = {name: getattr(result, name) for name in PrecomputeResult.COUNTS} | {"skipped": dict(result.skipped)}
    done |= {"cache_dir": str(result.cache_dir), "prompts_dir": str(result.prompts_dir)}
    write_json_atomic(status, {"done": result.finished, "result": done})


if __name__ == "__main__":
    main()
