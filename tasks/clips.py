"""Clip extraction: resample decoded frames to the training fps and size, and encode clips as H.264 with PyAV."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vidtune.tasks.files import atomic_path


class ClipParams(BaseModel):
    """The size and rate clips are stored at (the training resolution)."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(832, ge=16, description="Clip width in pixels (multiple of 16).")
    height: int = Field(480, ge=16, description="Clip height in pixels (multiple of 16).")
    fps: float = Field(16.0, gt=0, le=120, description="Clip frame rate; sources are resampled to it.")
    crf: int = Field(18, ge=0, le=51, description="x264 constant rate factor (lower = better, larger).")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = Field(
        "ultrafast",
        description="x264 speed preset: ultrafast encodes ~2x faster than superfast for ~15% larger files at the same "
        "crf (luma PSNR 45 vs 46 dB at crf 18); veryfast: ~3.5x smaller files, slower curation.",
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16 (VAE and patch sizes need it), got {value}")
        return value


def cover_crop_size(display_w: int, display_h: int, width: int, height: int) -> tuple[int, int]:
    """Size to resize a display_w x display_h image to so that it covers width x height (then centre-cropped)."""
    scale = max(width / display_w, height / display_h)
    return max(width, math.ceil(display_w * scale - 1e-6)), max(height, math.ceil(display_h * scale - 1e-6))


@dataclass(frozen=True)
class ColorTags:
    """How a clip's YUV values are to be read (matrix, range, primaries, transfer), copied from the source."""

    colorspace: int = 2  # 2 = unspecified in FFmpeg's enums
    color_range: int = 0
    color_primaries: int = 2
    color_trc: int = 2

    @classmethod
    def of(cls, frame: av.VideoFrame) -> ColorTags:
        return cls(frame.colorspace, frame.color_range, frame.color_primaries, frame.color_trc)


def to_training_frame(frame: av.VideoFrame, rotation: int, width: int, height: int) -> tuple[np.ndarray, ColorTags]:
    """Upright, resized to cover, centre-cropped yuv420p planes packed as (height * 3 / 2, width) uint8.

    Frames stay in YUV from decoder to encoder: a round trip through RGB would cost two colour conversions per
    frame (measured: the largest cost after decoding and encoding) and gain nothing.
    """
    quarter_turns = (rotation // 90) % 4
    display_w, display_h = (frame.height, frame.width) if quarter_turns % 2 else (frame.width, frame.height)
    cover_w, cover_h = (v + v % 2 for v in cover_crop_size(display_w, display_h, width, height))  # even for 4:2:0
    coded_w, coded_h = (cover_h, cover_w) if quarter_turns % 2 else (cover_w, cover_h)
    # AREA (box-filter averaging, anti-aliased when downscaling): with this PyAV/FFmpeg it is the faster of the
    # anti-aliased swscale filters (1280x544 -> 1130x480 YUV: 1.0 ms vs BICUBIC 2.0 ms per frame; bench/startup.py).
    scaled = frame.reformat(width=coded_w, height=coded_h, format="yuv420p", interpolation="AREA")
    flat = scaled.to_ndarray().ravel()
    luma_size, chroma_size = coded_w * coded_h, (coded_w // 2) * (coded_h // 2)
    planes = [
        flat[:luma_size].reshape(coded_h, coded_w),
        flat[luma_size : luma_size + chroma_size].reshape(coded_h // 2, coded_w // 2),
        flat[luma_size + chroma_size : luma_size + 2 * chroma_size].reshape(coded_h // 2, coded_w // 2),
    ]
    if quarter_turns:
        planes = [np.rot90(p, k=quarter_turns) for p in planes]
    top, left = ((cover_h - height) // 2) & ~1, ((cover_w - width) // 2) & ~1  # even: chroma stays aligned
    y = planes[0][top : top + height, left : left + width]
    u, v = (p[top // 2 : (top + height) // 2, left // 2 : (left + width) // 2] for p in planes[1:])
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(height * 3 // 2, width)
    return packed, ColorTags.of(scaled)


def yuv_to_rgb(packed: np.ndarray, tags: ColorTags = ColorTags()) -> np.ndarray:
    """RGB view of a training frame (for inspection and tests), converted by the same library that encodes."""
    frame = av.VideoFrame.from_ndarray(packed, format="yuv420p")
    frame.colorspace, frame.color_range = tags.colorspace, tags.color_range
    return frame.to_ndarray(format="rgb24")


@dataclass
class FrameResampler:
    """Maps source frames onto one output time grid t0 + k/fps, shared by every clip of a source.

    A source frame is shown from its timestamp until the next one; each grid point takes the frame on screen.
    """

    fps: float
    t0: float | None = None
    next_k: int = 0

    def grid_points(self, shown_from: float, shown_until: float) -> int:
        """How many grid points fall in [shown_from, shown_until) (advancing the grid; points before
        `shown_from`, in a gap nothing was shown in, are skipped)."""
        if self.t0 is None:
            self.t0 = shown_from
        while self.t0 + self.next_k / self.fps < shown_from - 1e-9:
            self.next_k += 1
        count = 0
        while self.t0 + self.next_k / self.fps < shown_until - 1e-9:
            count += 1
            self.next_k += 1
        return count


@dataclass
class ClipBuffer:
    """Training-size frames of the source frames that a future clip may still use."""

    frames: deque[tuple[int, np.ndarray, int]]  # (source index, image, how many grid points it fills)

    @classmethod
    def empty(cls) -> ClipBuffer:
        return cls(deque())

    def add(self, source_index: int, image: np.ndarray, repeats: int) -> None:
        if repeats > 0:
            self.frames.append((source_index, image, repeats))

    def take(self, start: int, end: int) -> list[np.ndarray]:
        return [img for idx, img, n in self.frames if start <= idx < end for _ in range(n)]

    def drop_before(self, index: int) -> None:
        while self.frames and self.frames[0][0] < index:
            self.frames.popleft()


def encode_clip(
    images: list[np.ndarray], path: Path, fps: float, params: ClipParams, color: ColorTags = ColorTags()
) -> None:
    """Write yuv420p `images` (see to_training_frame) as an H.264 MP4 at `path` atomically, tagged with the
    source's colour description, faststart so readers can stream it."""
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = params.width, params.height, "yuv420p"
            # One encoder thread: curate parallelises across sources, and small frames gain little from more.
            stream.options = {"crf": str(params.crf), "preset": params.preset, "threads": "1"}
            context = stream.codec_context
            context.colorspace, context.color_range = color.colorspace, color.color_range
            context.color_primaries, context.color_trc = color.color_primaries, color.color_trc
            for k, image in enumerate(images):
                frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
                frame.colorspace, frame.color_range, frame.pts = color.colorspace, color.color_range, k
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
