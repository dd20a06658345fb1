"""Tiny diffusers models: built from config, saved, and loaded through the path users take."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

from flows.cli import app


def test_tiny_wan_loads_with_from_pretrained_and_generates(tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    result = CliRunner().invoke(app, ["tiny-model", "wan", str(tmp_path / "wan")])
    assert result.exit_code == 0, result.output
    for part in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "wan" / part).exists()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "wan")
    assert isinstance(pipe, WanPipeline)
    video = pipe(
        prompt="a red car in sks style", num_frames=5, height=32, width=32, num_inference_steps=2,
        guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()


def test_unknown_family_lists_the_supported_ones(tmp_path):
    result = CliRunner().invoke(app, ["tiny-model", "sora", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unknown model family 'sora'; supported: animatediff, animatediff-sdxl, cogvideox, ltx-video, wan" in result.output
