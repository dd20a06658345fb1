"""Base and adapted samples from the same noise, written as MP4/GIF, and a PNG contact sheet to glance at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.files import atomic_path
from training.media import to_uint8, write_gif, write_mp4
from training.sampling import scheduler_copy


@dataclass(frozen=True)
class SampleSettings:
    prompts: list[str]
    num_frames: int
    height: int
    width: int
    inference_steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 42
    fps: int = 16


def render(pipe, settings: SampleSettings, out_dir: Path, label: str) -> list[np.ndarray]:
    """One video per prompt, each from `settings.seed` (so base and adapted start from the same noise)."""
    pipe.set_progress_bar_config(disable=True)
    videos = []
    for index, prompt in enumerate(settings.prompts):
        with torch.no_grad(), scheduler_copy(pipe):
            frames = pipe(
                prompt=prompt, num_frames=settings.num_frames, height=settings.height, width=settings.width,
                num_inference_steps=settings.inference_steps, guidance_scale=settings.guidance_scale,
                generator=torch.Generator().manual_seed(settings.seed), output_type="np",
            ).frames[0]  # fmt: skip
        video = to_uint8(frames)
        write_mp4(video, out_dir / f"{label}-{index:02d}.mp4", settings.fps)
        write_gif(video, out_dir / f"{label}-{index:02d}.gif", settings.fps)
        videos.append(video)
    return videos


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, columns: int = 6) -> Path:
    """A PNG grid: one row per (label, video), `columns` frames evenly spaced across each video."""
    height, width = rows[0][1].shape[1:3]
    label_w = 160
    sheet = Image.new("RGB", (label_w + columns * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, video) in enumerate(rows):
        picks = np.linspace(0, len(video) - 1, num=min(columns, len(video))).round().astype(int)
        for column, frame in enumerate(picks):
            sheet.paste(Image.fromarray(video[frame]), (label_w + column * width, row * height))
        draw.text((4, row * height + 4), label[:26], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
