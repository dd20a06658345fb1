"""Still images (jpg, png, webp) curated beside videos: each becomes one single-frame clip, framed like a shot of a
video (bars cropped, the closest aspect-ratio bucket, never enlarged past clips.max_upscale), so it is captioned,
scored, deduplicated and sharded with the rest and trains in the families whose VAE takes one frame."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vidtune.tasks.bars import Crop, black_level, detect_active_area
from vidtune.tasks.clips import (
    ClipParams,
    choose_size,
    encode_clip,
    low_resolution_reason,
    to_training_frame,
    to_working_frame,
    working_size,
)
from vidtune.tasks.records import ClipRecord, Source, SourceResult, Status, clip_id_for

IMAGE_EXTENSIONS = frozenset([".jpg", ".jpeg", ".png", ".webp"])
# Transparent pixels are laid on white: black would read as bars around a cut-out and be cropped away.
TRANSPARENT_BACKGROUND = (255, 255, 255)
SRGB_TRC, BT709 = 13, 1  # FFmpeg's enums: IEC 61966-2-1 transfer; BT.709 primaries and matrix


class ImageUnreadable(Exception):
    """The file is not a usable image; the message is the manifest reason."""


def is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str) -> np.ndarray:
    """The picture as upright 8-bit RGB (EXIF orientation applied, transparency over white, 16-bit scaled down);
    animated files give their first frame."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG: convert("L") would clip
                grey = (np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(grey)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                flat = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                image = flat
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"not an image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageUnreadable(f"image decoding failed: {exc}") from None
    height, width = rgb.shape[:2]
    if width < 2 or height < 2:
        raise ImageUnreadable(f"image too small to use: {width}x{height} pixels")
    return np.ascontiguousarray(rgb[: height - height % 2, : width - width % 2])  # 4:2:0 needs even sides


def extract_image(source: Source, clips: ClipParams, out_dir: Path, sample=None) -> SourceResult:
    """One image source's row: a kept single-frame clip written to `out_dir`, a `filtered` clip (too small once
    its bars are cropped), or a `failed` source row (not decodable). `sample` as in extract_clips."""
    try:
        rgb = load_image(source.local_path)
    except ImageUnreadable as exc:
        return SourceResult([ClipRecord.for_source(source, Status.FAILED, str(exc), media="image")])
    height, width = rgb.shape[:2]
    sizes = clips.sizes()
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    work_w, work_h = working_size(width, height, sizes)
    yuv = frame.reformat(
        width=work_w,
        height=work_h,
        format="yuv420p",
        dst_colorspace="ITU709",
        dst_color_range="MPEG",
        dst_color_trc=SRGB_TRC,
        dst_color_primaries=BT709,
        interpolation="AREA",
    )
    working, color = to_working_frame(yuv, 0, work_w, work_h)
    crop = Crop.full(work_w, work_h)
    if clips.crop_bars:
        crop = detect_active_area([working.y], black_level(color.color_range), clips.bar_threshold).even()
    full = crop.is_full(work_w, work_h)
    picture = Crop.full(width, height) if full else crop.scaled(width / work_w, height / work_h)
    row = ClipRecord(
        clip_id=clip_id_for(source.sha256, 0, 1),
        source=source.path,
        source_sha256=source.sha256,
        media="image",
        end_frame=1,
        num_frames=1,
        fps=clips.fps,
        crop_left=picture.left,
        crop_top=picture.top,
        active_width=picture.width,
        active_height=picture.height,
    )
    result = SourceResult([row])
    size = choose_size(picture.width, picture.height, sizes, clips.max_upscale)
    if size is None:
        row.status = Status.FILTERED
        row.reason = low_resolution_reason(picture.width, picture.height, sizes, clips.max_upscale)
        return result
    row.width, row.height = size
    images = [to_training_frame(working, crop, *size)]
    encode_clip(images, out_dir / f"{row.clip_id}.mp4", clips.fps, clips, color)
    if sample is not None:
        result.sampled[row.clip_id] = sample(images, clips.fps, color)
    return result
