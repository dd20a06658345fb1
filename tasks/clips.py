"""Clip extraction: resample decoded frames to the training fps, frame each shot's picture at its training size
(aspect-ratio buckets, no blowing up), and encode clips as H.264 with PyAV."""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vidtune.tasks.bars import Crop
from vidtune.tasks.files import atomic_path

SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
WORKING_MARGIN = 2.0  # buffered frames keep 2x the largest training size: crops to half the frame never upscale


def parse_size(text: str) -> tuple[int, int]:
    """ "832x480" -> (832, 480), both multiples of 16."""
    match = SIZE_PATTERN.match(str(text).strip())
    if not match:
        raise ValueError(f"sizes are WIDTHxHEIGHT in pixels, e.g. 832x480; got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ValueError(f"{text}: width and height must be multiples of 16 (VAE and patch sizes need it)")
    return width, height


class ClipParams(BaseModel):
    """The sizes and rate clips are stored at (the training resolutions), and how the picture is framed."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(832, ge=16, description="Landscape clip width in pixels (multiple of 16).")
    height: int = Field(480, ge=16, description="Landscape clip height in pixels (multiple of 16).")
    buckets: list[str] | None = Field(
        None,
        description="Training sizes WIDTHxHEIGHT (multiples of 16); each shot goes to the one closest to its picture's "
        "aspect ratio. Default: width x height, its portrait transpose and the square of the same area.",
    )
    max_upscale: float = Field(
        1.5,
        ge=1.0,
        description="Most a shot's picture may be enlarged to reach its size; smaller pictures go to a smaller bucket "
        "that fits, or are filtered as 'resolution too low'.",
    )
    crop_bars: bool = Field(True, description="Crop letterbox/pillarbox bars (dark borders) of each shot.")
    bar_threshold: int = Field(10, ge=1, le=64, description="Luma levels above black that count as picture.")
    fps: float = Field(16.0, gt=0, le=120, description="Clip frame rate; sources are resampled to it.")
    images: bool = Field(
        True, description="Curate jpg/png/webp files in the input too, each as a single-frame clip (manifest media)."
    )
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

    @field_validator("buckets")
    @classmethod
    def _sizes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("needs at least one size (or null for the default)")
            for size in value:
                parse_size(size)
        return value

    def sizes(self) -> list[tuple[int, int]]:
        """The training sizes (width, height), without repeats."""
        if self.buckets is not None:
            return list(dict.fromkeys(parse_size(s) for s in self.buckets))
        side = max(16, round(math.sqrt(self.width * self.height) / 16) * 16)
        return list(dict.fromkeys([(self.width, self.height), (self.height, self.width), (side, side)]))


def cover_crop_size(display_w: int, display_h: int, width: int, height: int) -> tuple[int, int]:
    """Size to resize a display_w x display_h image to so that it covers width x height (then centre-cropped)."""
    scale = max(width / display_w, height / display_h)
    return max(width, math.ceil(display_w * scale - 1e-6)), max(height, math.ceil(display_h * scale - 1e-6))


def upscale_needed(picture_w: int, picture_h: int, width: int, height: int) -> float:
    """How much a picture must be enlarged to cover width x height (below 1: it is shrunk)."""
    return max(width / picture_w, height / picture_h)


def choose_size(
    picture_w: int, picture_h: int, sizes: list[tuple[int, int]], max_upscale: float
) -> tuple[int, int] | None:
    """The training size for a picture: among the sizes it covers with at most `max_upscale`, the closest in aspect
    ratio (then the larger); None when every size would blow it up more."""
    fitting = [s for s in sizes if upscale_needed(picture_w, picture_h, *s) <= max_upscale + 1e-9]
    if not fitting:
        return None
    aspect = math.log(picture_w / picture_h)
    return min(fitting, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 6), -s[0] * s[1]))


def low_resolution_reason(picture_w: int, picture_h: int, sizes: list[tuple[int, int]], max_upscale: float) -> str:
    """Why a picture has no training size, and the settings that would give it one."""
    least = min(sizes, key=lambda s: upscale_needed(picture_w, picture_h, *s))
    factor = upscale_needed(picture_w, picture_h, *least)
    fit_w, fit_h = (int(v * max_upscale) // 16 * 16 for v in (picture_w, picture_h))
    hint = f"add a size that fits to clips.buckets (e.g. {fit_w}x{fit_h}) or " if min(fit_w, fit_h) >= 16 else ""
    return (
        f"resolution too low: the picture is {picture_w}x{picture_h}, {factor:.1f}x upscaling to reach the nearest "
        f"training size {least[0]}x{least[1]}, over clips.max_upscale {max_upscale}; {hint}raise clips.max_upscale"
    )


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


@dataclass(frozen=True)
class WorkingFrame:
    """An upright yuv420p frame at the working size (the source's, or smaller for large sources): what is kept
    of a source frame until its clip's framing (bars, size) is known."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.y.shape[1], self.y.shape[0]


def working_size(display_w: int, display_h: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The display size shrunk (never enlarged) to WORKING_MARGIN x the largest training size it must cover, even."""
    scale = min(1.0, WORKING_MARGIN * max(upscale_needed(display_w, display_h, w, h) for w, h in sizes))
    return max(2, round(display_w * scale / 2) * 2), max(2, round(display_h * scale / 2) * 2)


def to_working_frame(frame: av.VideoFrame, rotation: int, width: int, height: int) -> tuple[WorkingFrame, ColorTags]:
    """`frame` upright at width x height (display orientation).

    Frames stay in YUV from decoder to encoder: a round trip through RGB would cost two colour conversions per
    frame (measured: the largest cost after decoding and encoding) and gain nothing.
    """
    quarter_turns = (rotation // 90) % 4
    coded_w, coded_h = (height, width) if quarter_turns % 2 else (width, height)
    if frame.format.name == "yuv420p" and (frame.width, frame.height) == (coded_w, coded_h):
        scaled = frame
    else:
        # AREA (box-filter averaging, anti-aliased when downscaling): with this PyAV/FFmpeg it is the faster of the
        # anti-aliased swscale filters (1280x544 -> 1130x480 YUV: 1.0 ms vs BICUBIC 2.0 ms per frame).
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
    return WorkingFrame(*planes), ColorTags.of(scaled)


def to_training_frame(frame: WorkingFrame, crop: Crop, width: int, height: int) -> np.ndarray:
    """The `crop` of a working frame resized to cover width x height and centre-cropped: yuv420p planes packed as
    (height * 3 / 2, width) uint8. `crop` is even (chroma stays aligned)."""
    cover_w, cover_h = (v + v % 2 for v in cover_crop_size(crop.width, crop.height, width, height))  # even for 4:2:0
    # Shrinking averages (no aliasing), enlarging (at most clips.max_upscale) interpolates smoothly.
    interpolation = cv2.INTER_AREA if cover_w <= crop.width else cv2.INTER_CUBIC
    top, left = ((cover_h - height) // 2) & ~1, ((cover_w - width) // 2) & ~1  # even: chroma stays aligned
    packed = []
    for plane, div in ((frame.y, 1), (frame.u, 2), (frame.v, 2)):
        part = plane[
            crop.top // div : (crop.top + crop.height) // div, crop.left // div : (crop.left + crop.width) // div
        ]
        resized = cv2.resize(np.ascontiguousarray(part), (cover_w // div, cover_h // div), interpolation=interpolation)
        packed.append(resized[top // div : (top + height) // div, left // div : (left + width) // div].ravel())
    return np.concatenate(packed).reshape(height * 3 // 2, width)


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
    """Working frames of the source frames that a future clip may still use."""

    frames: deque[tuple[int, WorkingFrame, int]]  # (source index, frame, how many grid points it fills)

    @classmethod
    def empty(cls) -> ClipBuffer:
        return cls(deque())

    def add(self, source_index: int, image: WorkingFrame, repeats: int) -> None:
        if repeats > 0:
            self.frames.append((source_index, image, repeats))

    def take(self, start: int, end: int) -> list[WorkingFrame]:
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
            stream.height, stream.width = images[0].shape[0] * 2 // 3, images[0].shape[1]
            stream.pix_fmt = "yuv420p"
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
