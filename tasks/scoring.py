"""Clip scores: CLIP text-video alignment (open_clip) and motion (optical flow), from frames sampled with decord.

Models are loaded once per worker process (`cached_model`) and shared by its threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.training.clip_configs import register_model_configs

T = TypeVar("T")


class ClipModelParams(BaseModel):
    """An open_clip model and its weights, declared once: curation's scores and evaluation's metrics use it."""

    model_config = ConfigDict(extra="forbid")

    clip_model: str | None = Field(
        "ViT-B-32", description="open_clip model name (or 'local-dir:PATH', 'hf-hub:ORG/NAME'); null: no CLIP."
    )
    clip_pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag (downloads) or a local weights file."
    )


class ScoreParams(ClipModelParams):
    """Which scores are computed and with which models (thresholds live in FilterParams)."""

    clip: bool = Field(True, description="Compute the CLIP text-video score and image embedding.")
    clip_frames: int = Field(4, ge=1, le=32, description="Frames per clip for the CLIP score, evenly spaced.")
    motion: bool = Field(True, description="Compute the optical-flow motion score.")
    motion_fps: float = Field(2.0, gt=0, le=30, description="Rate frames are sampled at for optical flow.")
    motion_width: int = Field(128, ge=32, le=1024, description="Width frames are downscaled to for optical flow.")
    text_area: bool = Field(
        False,
        description="Compute the OCR text-area score (PP-OCR text detection on the CLIP frames; ~0.45 CPU-s per clip).",
    )
    aesthetic_head: str | None = Field(
        None,
        description="LAION aesthetic predictor head on the CLIP embedding: a .pth/.safetensors file or a URL "
        "(downloaded once to $VIDTUNE_HOME/models/aesthetic); null: no aesthetic score.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run (auto = cuda if available).")

    @model_validator(mode="after")
    def _no_model_no_clip(self) -> ScoreParams:
        if self.clip_model is None:
            self.clip = False  # clip_model null means no CLIP here too, as in evaluation
        return self

    @model_validator(mode="after")
    def _aesthetic_needs_clip(self) -> ScoreParams:
        if self.aesthetic_head and not self.clip:
            raise ValueError("aesthetic_head scores the CLIP embedding, but scores.clip is false (or clip_model null)")
        return self


def evenly_spaced(total: int, count: int) -> list[int]:
    """Indices of at most `count` evenly spaced items of `total`, first and last included."""
    return np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist() if total else []


class FramesUnavailable(Exception):
    """A clip's frames could not be read back; the message is the manifest reason."""


# --------------------------------------------------------------------------------------------- model cache

_models: dict[tuple, object] = {}
_models_lock = threading.Lock()


def cached_model(key: tuple, load: Callable[[], T]) -> T:
    """One instance per process for each key: threads of a worker share it, Dask/Ray workers load their own."""
    with _models_lock:
        if key not in _models:
            _models[key] = load()
        return _models[key]  # type: ignore[return-value]


def local_version(reference: str | None) -> tuple:
    """(size, mtime) of a local weights file, or of the files in a local model folder; () for hub ids and tags."""
    path = Path(reference).expanduser() if reference else None
    if path is None or not path.exists():
        return ()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(f.relative_to(path)), stat.st_size, stat.st_mtime_ns) for f in files for stat in [f.stat()])


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from vidtune.training.devices import placement

    return placement()[0]


# --------------------------------------------------------------------------------------------- frames


@dataclass
class SampledFrames:
    clip: np.ndarray  # (clip_frames, H, W, 3) uint8, evenly spaced
    motion: np.ndarray  # (n, H, W, 3) uint8 at ~motion_fps
    motion_dt: float  # seconds between motion frames


def _sample_indices(n: int, fps: float, clip_frames: int, motion_fps: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Which of a clip's `n` frames the CLIP score (evenly spaced) and the motion score (~motion_fps) read."""
    clip_idx = np.linspace(0, n - 1, clip_frames).round().astype(int)
    step = max(1, round(fps / motion_fps))
    return clip_idx, np.arange(0, n, step), step


def sample_frames(path: Path, fps: float, clip_frames: int, motion_fps: float) -> SampledFrames:
    """Read the frames both scores need from an encoded clip in one decord batch."""
    import decord

    from vidtune.training.media import FrameReader

    try:
        reader = FrameReader(path)
        n = len(reader)
        if n == 0:
            raise FramesUnavailable("frames could not be sampled: the clip has no frames")
        clip_idx, motion_idx, step = _sample_indices(n, fps, clip_frames, motion_fps)
        wanted = np.unique(np.concatenate([clip_idx, motion_idx]))
        batch = reader.get(wanted.tolist())
    except (decord.DECORDError, RuntimeError) as exc:  # decord raises RuntimeError for unopenable files
        raise FramesUnavailable(f"frames could not be sampled: {str(exc).splitlines()[0]}") from exc
    position = {int(i): k for k, i in enumerate(wanted)}
    return SampledFrames(
        clip=batch[[position[int(i)] for i in clip_idx]],
        motion=batch[[position[int(i)] for i in motion_idx]],
        motion_dt=step / fps,
    )


def sample_images(images: list[np.ndarray], fps: float, clip_frames: int, motion_fps: float, to_rgb) -> SampledFrames:
    """The same frames as `sample_frames`, taken from the clip's frames while it is written (no second decode):
    `to_rgb` converts the few that are read."""
    clip_idx, motion_idx, step = _sample_indices(len(images), fps, clip_frames, motion_fps)
    rgb = {int(i): to_rgb(images[int(i)]) for i in np.unique(np.concatenate([clip_idx, motion_idx]))}
    return SampledFrames(
        clip=np.stack([rgb[int(i)] for i in clip_idx]),
        motion=np.stack([rgb[int(i)] for i in motion_idx]),
        motion_dt=step / fps,
    )


# --------------------------------------------------------------------------------------------- motion


def motion_score(frames: np.ndarray, dt: float, width: int = 128) -> float:
    """Mean Farnebäck optical-flow magnitude, in percent of the frame width per second (0 for <2 frames)."""
    import cv2

    if len(frames) < 2:
        return 0.0
    h, w = frames.shape[1:3]
    size = (width, max(8, round(h * width / w)))
    gray = [cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for f in frames]
    magnitudes = []
    for prev, nxt in zip(gray, gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
    return float(np.mean(magnitudes)) / width * 100 / dt


# --------------------------------------------------------------------------------------------- CLIP


class ClipScorer:
    """open_clip image/text towers; a clip's score is the mean per-frame cosine with its caption."""

    def __init__(self, model_name: str, pretrained: str | None, device: str):
        import open_clip
        import torch

        register_model_configs()
        self.torch = torch
        self.device = device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
        self.model.eval()
        self.embed_dim: int | None = getattr(self.model.visual, "output_dim", None)  # timm towers do not say
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.lock = threading.Lock()  # threads of a worker share this model: one forward pass at a time

    def embed(self, frames: np.ndarray, texts: list[str]):
        """L2-normalised CLIP embeddings: (frames, dim) for uint8 RGB `frames`, (len(texts), dim) for `texts`."""
        from PIL import Image

        torch = self.torch
        pixels = torch.stack([self.preprocess(Image.fromarray(img)) for img in frames])
        with self.lock, torch.inference_mode():
            images = self.model.encode_image(pixels.to(self.device)).float()
            text = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(text, dim=-1)

    def score(self, frames_per_clip: list[np.ndarray], captions: list[str]) -> tuple[list[float], np.ndarray]:
        """(score per clip, L2-normalised mean image embedding per clip, float32)."""
        torch = self.torch
        counts = [len(f) for f in frames_per_clip]
        images, texts = self.embed(np.concatenate(frames_per_clip), captions)
        scores, embeddings, offset = [], [], 0
        for clip, count in enumerate(counts):
            frame_embeddings = images[offset : offset + count]
            offset += count
            scores.append(float((frame_embeddings @ texts[clip]).mean()))
            embeddings.append(torch.nn.functional.normalize(frame_embeddings.mean(0), dim=0))
        return scores, torch.stack(embeddings).cpu().numpy().astype(np.float32)
