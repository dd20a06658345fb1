"""Rendering samples from fixed prompts and seed, written as MP4 and GIF: validation during training here, and
the base-vs-adapted comparison of `evaluation` through the same `render_videos`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidtune.training.cache import load_prompt
from vidtune.training.data import first_frames
from vidtune.training.families import ModelFamily, TextEmbeddings
from vidtune.training.files import atomic_path, write_json_atomic
from vidtune.training.media import read_image, to_uint8, write_gif, write_mp4
from vidtune.training.params import ValidationParams


@dataclass(frozen=True)
class SampleSettings:
    """`SamplingParams` resolved for one run: every size known, the prompts with their trigger words."""

    prompts: list[str]
    num_frames: int
    height: int
    width: int
    inference_steps: int
    guidance_scale: float
    seed: int
    fps: int


@contextmanager
def scheduler_copy(pipe) -> Iterator[None]:
    """Sampling sets the scheduler's inference timesteps; training and validation loss read its full table."""
    original = pipe.scheduler
    pipe.scheduler = copy.deepcopy(original)
    try:
        yield
    finally:
        pipe.scheduler = original


PIPELINE_PROMPT_ARGS = {"embeds": "prompt_embeds", "mask": "prompt_attention_mask", "pooled": "pooled_prompt_embeds"}


def prompt_arguments(text: TextEmbeddings, negative: TextEmbeddings, like: torch.Tensor) -> dict:
    """Precomputed embeddings as diffusers pipeline arguments (`prompt_embeds`, `negative_prompt_embeds`, and the
    mask / pooled ones where the family has them), in `like`'s device and dtype (masks keep theirs)."""
    args = {}
    for prefix, embeddings in (("", text), ("negative_", negative)):
        for field, name in PIPELINE_PROMPT_ARGS.items():
            value = getattr(embeddings, field)
            if value is not None:
                args[prefix + name] = value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)
    return args


def conditioning_images(
    family: ModelFamily, count: int, images: list[str], shards: list[str], holdout_clip_ids: list[str]
) -> list | None:
    """The conditioning image (PIL) of each of `count` samples of an image-to-video family: `images` (files) in
    turn, else the held-out clips' first frames from the curated `shards`, cycling; None for text-to-video (and
    when there is nothing to render)."""
    if not family.image_conditioned or not count:
        return None
    pictures = [read_image(path, "validation.images") for path in images] or first_frames(shards, holdout_clip_ids)
    if not pictures:
        raise ValueError(
            f"holdout_clips: {family.title} ({family.name}) renders samples from conditioning images, and none of "
            f"the {len(holdout_clip_ids)} held-out clips is in the curated shards; hold clips out (holdout_clips) "
            "or give validation.images"
        )
    return [pictures[index % len(pictures)] for index in range(count)]


def write_conditioning_images(conditioning: list[dict] | None, out_dir: Path) -> None:
    """`out_dir/image-NN.png`: the image sample NN starts from (an image-to-video family's `image` argument, as the
    pipeline receives it), beside the samples; nothing for text-to-video."""
    for index, arguments in enumerate(conditioning or []):
        if arguments.get("image") is not None:
            with atomic_path(out_dir / f"image-{index:02d}.png") as tmp:
                arguments["image"].save(tmp, format="PNG")


def render_videos(
    pipe,
    settings: SampleSettings,
    out_dir: Path,
    label: str,
    prompt_cache: Path | None = None,
    conditioning: list[dict] | None = None,
) -> list[np.ndarray]:
    """`out_dir/{label}-NN.mp4|gif`, one per prompt, each from `settings.seed` (the same noise every time). With
    `prompt_cache` (see `vidtune.training.cache.cache_prompts`) the prompts' stored embeddings are used: no text encoder.
    `conditioning`: per prompt, the family's `sampling_arguments` (an image-to-video family's image)."""
    pipe.set_progress_bar_config(disable=True)
    videos = []
    like = next(pipe.vae.parameters())
    negative = load_prompt(prompt_cache, "") if prompt_cache is not None else None
    with torch.no_grad(), scheduler_copy(pipe):
        for index, prompt in enumerate(settings.prompts):
            text = (
                {"prompt": prompt}
                if negative is None
                else prompt_arguments(load_prompt(prompt_cache, prompt), negative, like)
            )
            frames = pipe(
                **text,
                num_frames=settings.num_frames,
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=torch.Generator().manual_seed(settings.seed),
                output_type="np",
                **(conditioning[index] if conditioning else {}),
            ).frames[0]
            video = to_uint8(frames)
            write_mp4(video, out_dir / f"{label}-{index:02d}.mp4", settings.fps)
            write_gif(video, out_dir / f"{label}-{index:02d}.gif", settings.fps)
            videos.append(video)
    return videos


def render_samples(
    pipe,
    denoisers: list[torch.nn.Module],
    params: ValidationParams,
    size: tuple[int, int, int],
    out_dir: Path,
    prompt_cache: Path | None = None,
    conditioning: list[dict] | None = None,
) -> None:
    """Validation samples `out_dir/sample-NN.mp4|gif`, and `image-NN.png` (see `write_conditioning_images`) for
    `conditioning` (see `render_videos`). Training's RNG streams are left exactly as they were, so a run with
    validation trains like one without."""
    settings = SampleSettings(
        params.prompts,
        params.num_frames or size[0],
        params.height or size[1],
        params.width or size[2],
        params.inference_steps,
        params.guidance_scale,
        params.seed,
        params.fps,
    )
    devices = [pipe.device] if pipe.device.type == "cuda" else []
    was_training = [denoiser.training for denoiser in denoisers]
    for denoiser in denoisers:
        denoiser.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            render_videos(pipe, settings, out_dir, "sample", prompt_cache, conditioning)
    finally:
        for denoiser, mode in zip(denoisers, was_training):
            denoiser.train(mode)
    write_conditioning_images(conditioning, out_dir)
    write_json_atomic(out_dir / "prompts.json", {f"sample-{i:02d}": p for i, p in enumerate(params.prompts)})
