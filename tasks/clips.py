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

from tasks.files import atomic_path


class ClipParams(BaseModel):
    """The size and rate clips are stored at (the training resolution)."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(832, ge=16, description="Clip width in pixels (multiple of 16).")
    height: int = Field(480, ge=16, description="Clip height in pixels (multiple of 16).")
    fps: float = Field(16.0, gt=0, le=120, description="Clip frame rate; sources are resampled to it.")
    crf: int = Field(18, ge=0, le=51, description="x264 constant rate factor (lower = better, larger).")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = Field(
        "veryfast", description="x264 speed preset."
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


def to_training_frame(frame: av.VideoFrame, rotation: int, width: int, height: int) -> np.ndarray:
    """Upright, resized to cover, centre-cropped RGB uint8 array of shape (height, width, 3)."""
    quarter_turns = (rotation // 90) % 4
    display_w, display_h = (frame.height, frame.width) if quarter_turns % 2 else (frame.width, frame.height)
    cover_w, cover_h = cover_crop_size(display_w, display_h, width, height)
    coded_w, coded_h = (cover_h, cover_w) if quarter_turns % 2 else (cover_w, cover_h)
    rgb = frame.to_ndarray(width=coded_w, height=coded_h, format="rgb24", interpolation="AREA")
    if quarter_turns:
        rgb = np.rot90(rgb, k=quarter_turns)
    top, left = (cover_h - height) // 2, (cover_w - width) // 2
    return np.ascontiguousarray(rgb[top : top + height, left : left + width])


@dataclass
class FrameResampler:
    """Maps source frames onto one output time grid t0 + k/fps, shared by every clip of a source.

    A source frame is shown from its timestamp until the next one; each grid point takes the frame on screen.
    """

    fps: float
    t0: float | None = None
    next_k: int = 0

    def grid_points(self, shown_from: float, shown_until: float) -> int:
        """How many grid points fall in [shown_from, shown_until) (advancing the grid)."""
        if self.t0 is None:
            self.t0 = shown_from
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


def encode_clip(images: list[np.ndarray], path: Path, fps: float, params: ClipParams) -> None:
    """Write `images` as an H.264 MP4 at `path` atomically (faststart, so readers can stream it)."""
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = params.width, params.height, "yuv420p"
            # One encoder thread: curate parallelises across sources, and small frames gain little from more.
            stream.options = {"crf": str(params.crf), "preset": params.preset, "threads": "1"}
            for k, image in enumerate(images):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = k
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
