"""Evaluate a finished run: base vs adapted samples from the same noise, held-out validation loss, CLIP
alignment, frame consistency, flicker, motion, and FVD when an I3D TorchScript file is given; an image-to-video run
renders from the same conditioning images as its validation samples and adds first-frame fidelity. Writes
RUN/evaluation/{metrics.json, heldout_losses.json, report.md, contact_sheet.png, samples/}."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vidtune.evaluation.gate import band_gains, paired_gain
from vidtune.evaluation.metrics import (
    IMAGE_METRICS,
    METRICS,
    clip_alignment,
    first_frame_clip,
    first_frame_psnr,
    frame_consistency,
    frechet_distance,
    mean,
    temporal_flicker,
)
from vidtune.evaluation.report import metrics_markdown
from vidtune.evaluation.samples import contact_sheet
from vidtune.training.adapters import load_adapter
from vidtune.training.data import read_clips
from vidtune.training.devices import placement
from vidtune.training.families import get_family
from vidtune.training.files import atomic_path, write_json_atomic
from vidtune.training.heldout import HeldoutLosses, heldout_losses, measured_on
from vidtune.training.job import TrainJob
from vidtune.training.layout import DatasetLayout, RunLayout
from vidtune.training.sampling import SampleSettings, conditioning_images, render_videos, write_conditioning_images

Embedder = Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]]  # frames, texts -> normalised embeddings
MotionFn = Callable[[np.ndarray, float], float]  # frames, seconds between frames -> magnitude


def _video_metrics(
    videos: list[np.ndarray],
    prompts: list[str],
    embed: Embedder | None,
    motion: MotionFn | None,
    fps: int,
    images: list[np.ndarray] | None = None,
) -> dict:
    """`images`: an image-to-video run's conditioning images (uint8, each its video's size) for first-frame fidelity."""
    out: dict = {"temporal_flicker": mean([temporal_flicker(v) for v in videos])}
    if images is not None:
        out["first_frame_psnr"] = mean([first_frame_psnr(video, image) for video, image in zip(videos, images)])
    if embed is not None:
        pairs = [embed(video, [prompt]) for video, prompt in zip(videos, prompts)]
        out["clip_alignment"] = mean([clip_alignment(frames, texts[0]) for frames, texts in pairs])
        out["frame_consistency"] = mean([frame_consistency(frames) for frames, _ in pairs])
        if images is not None:
            given, _ = embed(np.stack(images), prompts)
            out["first_frame_clip"] = mean(
                [first_frame_clip(frames, image) for (frames, _), image in zip(pairs, given)]
            )
    if motion is not None:
        out["motion"] = mean([motion(video, 1 / fps) for video in videos])
    return out


def _fitted(videos: list[np.ndarray], images: list) -> list[np.ndarray]:
    """The conditioning `images` (PIL), each resized to its video's size as the pipeline resizes it."""
    from PIL import Image

    return [np.asarray(i.resize((v.shape[2], v.shape[1]), Image.Resampling.LANCZOS)) for v, i in zip(videos, images)]


def _i3d_features(i3d_path: str, videos: list[np.ndarray]) -> np.ndarray:
    """Features of a user-supplied I3D TorchScript: input (1, 3, frames, h, w) in [-1, 1], output (1, features).
    One video at a time: held-out clips come from several buckets (lengths and sizes differ)."""
    model = torch.jit.load(i3d_path, map_location="cpu").eval()
    rows = []
    for video in videos:
        batch = (torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1)[None]
        with torch.no_grad():
            try:  # the common FVD export (StyleGAN-V's i3d_torchscript.pt) takes these switches
                features = model(batch, rescale=False, resize=True, return_features=True)
            except (RuntimeError, TypeError):
                features = model(batch)
        rows.append(features.reshape(-1).numpy())
    return np.stack(rows)


def _real_videos(job: TrainJob) -> list[np.ndarray]:
    """The held-out clips as uint8 videos, decoded from the curated shards."""
    shards = DatasetLayout(Path(job.tags.get("data", ""))).shard_files()
    batches = read_clips("shards", shards, job.frame_buckets, set(job.holdout_clip_ids))
    return [((b["video"][0].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for b in batches]


def heldout_comparison(base: HeldoutLosses, adapted: HeldoutLosses, draws: int, note: str | None) -> dict:
    """The adapted model's paired gain over the base (overall and per band) with its interval, and the evidence."""
    gain = paired_gain(base.as_dict(), adapted.as_dict())
    out = {
        "val_loss_gain": gain.estimate,
        "val_loss_gain_low": gain.low,
        "val_loss_gain_high": gain.high,
        "heldout_draws": gain.draws,
        "heldout_draws_per_clip": draws,
        "val_loss_se_base": base.standard_error(),
        "val_loss_se_adapted": adapted.standard_error(),
    }
    for band, value in band_gains(base.as_dict(), adapted.as_dict()).items():
        key = f"val_loss_gain_{band}_noise"  # not val_loss_gain_low: that is the overall interval's bound
        out |= {key: value.estimate, f"{key}_low": value.low, f"{key}_high": value.high}
    return out | ({"holdout_note": note} if note else {})


def evaluate_run(
    run_dir: str | Path,
    settings: SampleSettings,
    embed: Embedder | None = None,
    motion: MotionFn | None = None,
    i3d_path: str | None = None,
    draws: int = 16,
) -> dict:
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    job = TrainJob.read(run_dir)
    family = get_family(job.family)
    heldout = list(read_clips(job.data_source, job.shards, job.frame_buckets, set(job.holdout_clip_ids)))
    real = _real_videos(job) if i3d_path else []
    validation = job.params.validation
    images = conditioning_images(
        family, len(settings.prompts), validation.images, job.curated_shards(), job.holdout_clip_ids
    )  # image-to-video: base and adapted start from the same images as the run's validation samples
    conditioning = None if images is None else [family.sampling_arguments(image) for image in images]
    write_conditioning_images(conditioning, layout.evaluation_samples)  # image-NN.png: base-NN's and adapted-NN's

    results, videos, losses = {}, {}, {}
    device, dtype = placement()
    pipe = family.load_pipeline(job.model, dtype=dtype).to(device)
    for label in ("base", "adapted"):
        if label == "adapted":
            if job.params.training_type == "lora":
                load_adapter(pipe, layout.adapter)  # both files of a two-expert LoRA
            else:
                del pipe
                pipe = family.load_pipeline(str(layout.model), dtype=dtype).to(device)
        # One fixed objective for every run (not the run's own timestep settings), the same draws for both
        # models: per-draw losses that pair. Before sampling sets inference timesteps.
        losses[label] = heldout_losses(family, pipe, heldout, draws=draws) if heldout else None
        loss = losses[label].mean() if losses[label] else None
        videos[label] = render_videos(pipe, settings, layout.evaluation_samples, label, conditioning=conditioning)
        fitted = None if images is None else _fitted(videos[label], images)
        results[label] = {
            **_video_metrics(videos[label], settings.prompts, embed, motion, settings.fps, fitted),
            "val_loss": loss,
            **{f"val_loss_{band}": v for band, v in (losses[label].band_means() if losses[label] else {}).items()},
        }
    measured = [name for name in METRICS if name != "fvd"] + (list(IMAGE_METRICS) if images is not None else [])
    results = {f"{name}_{label}": results[label].get(name) for name in measured for label in ("base", "adapted")}
    fvd_note = "not computed: pass evaluation.i3d_path (an I3D TorchScript file) to compute FVD"
    if i3d_path and len(real) >= 2 and len(settings.prompts) >= 2:
        for label in ("base", "adapted"):
            results[f"fvd_{label}"] = frechet_distance(
                _i3d_features(i3d_path, real), _i3d_features(i3d_path, videos[label])
            )
        fvd_note = f"against {len(real)} held-out clips"
    elif i3d_path:
        fvd_note = "not computed: needs at least 2 prompts and 2 held-out clips (holdout_clips)"
    results.update(heldout_clips=len(heldout), fvd_note=fvd_note, prompts=settings.prompts)
    if heldout:
        results.update(heldout_comparison(losses["base"], losses["adapted"], draws, job.holdout_note))
        write_json_atomic(
            layout.heldout_losses,
            {label: value.as_dict() for label, value in losses.items()}
            | {"draws": draws, "measured_on": measured_on(device, dtype)},
        )
    rows = [
        (f"{label} {i}: {prompt}", videos[label][i])
        for i, prompt in enumerate(settings.prompts)
        for label in ("base", "adapted")
    ]
    contact_sheet(rows, layout.contact_sheet)
    write_json_atomic(layout.metrics, results)
    with atomic_path(layout.report) as tmp:
        tmp.write_text(metrics_markdown(results, run_dir))
    return results
