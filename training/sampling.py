"""Validation samples: fixed prompts and seed rendered with the current weights, written as MP4 and GIF."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from training.files import write_json_atomic
from training.media import to_uint8, write_gif, write_mp4
from training.params import ValidationParams


@contextmanager
def scheduler_copy(pipe) -> Iterator[None]:
    """Sampling sets the scheduler's inference timesteps; training and validation loss read its full table."""
    original = pipe.scheduler
    pipe.scheduler = copy.deepcopy(original)
    try:
        yield
    finally:
        pipe.scheduler = original


def render_samples(pipe, denoiser: torch.nn.Module, params: ValidationParams, size: tuple[int, int, int], out_dir: Path) -> list[Path]:
    """One MP4 + GIF per prompt in `out_dir`. Training's RNG streams are left exactly as they were, so a run
    with validation trains like one without."""
    frames, height, width = params.num_frames or size[0], params.height or size[1], params.width or size[2]
    devices = [pipe.device] if pipe.device.type == "cuda" else []
    written = []
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), scheduler_copy(pipe):
            for index, prompt in enumerate(params.prompts):
                video = pipe(
                    prompt=prompt, num_frames=frames, height=height, width=width,
                    num_inference_steps=params.inference_steps, guidance_scale=params.guidance_scale,
                    generator=torch.Generator().manual_seed(params.seed), output_type="np",
                ).frames[0]  # fmt: skip
                video = to_uint8(video)
                written.append(write_mp4(video, out_dir / f"sample-{index:02d}.mp4", params.fps))
                write_gif(video, out_dir / f"sample-{index:02d}.gif", params.fps)
    finally:
        denoiser.train(was_training)
    write_json_atomic(out_dir / "prompts.json", {f"sample-{i:02d}": p for i, p in enumerate(params.prompts)})
    return written
