"""Every kind of bad input the curate flow must turn into a manifest row instead of a crash."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from vidtune.tasks.synthetic_videos import render_video


@dataclass(frozen=True)
class Expected:
    status: str  # kept | filtered | failed
    reason: str  # substring of the manifest reason ("" for kept)
    root_can_read: bool = True  # False: the check needs a non-root user


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32)[None, :]
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _corrupt_middle(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    # 32 KB of garbage spans several frames and their NAL length fields, as a damaged disk sector or an
    # interrupted copy would; a few bytes inside one frame's residual data is undetectable by any decoder.
    data[middle : middle + 32768] = np.random.default_rng(0).integers(0, 256, 32768, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def _rewrite_without_timestamps(src: Path, dst: Path) -> None:
    """Re-encode with every timestamp 0 and a nonsense stream rate, as some broken muxers do."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = (
            source.streams.video[0].width,
            source.streams.video[0].height,
            "yuv420p",
        )
        for frame in source.decode(video=0):
            frame.pts = None
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _encode(
    path: Path, codec: str, width: int, height: int, pix_fmt: str, frames: int, fps: int = 8, **options: str
) -> None:
    """A moving pattern in any codec and pixel format (10-bit, 4:2:2, odd sizes) at `fps`."""
    from fractions import Fraction

    tile = np.random.default_rng(3).integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pattern = tile.repeat(16, 0).repeat(16, 1)[:height, :width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, pix_fmt, options
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(pattern, 8 * i, axis=1), format="rgb24").reformat(format=pix_fmt)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _zero_size_header(src: Path, dst: Path) -> None:
    """The same H.264 stream with 0 x 0 in the track header and the sample description (the bitstream knows)."""
    data = bytearray(src.read_bytes())
    entry = data.index(b"avc1", data.index(b"stsd"))
    data[entry + 28 : entry + 32] = bytes(4)  # VisualSampleEntry width, height (16 bits each)
    track = data.index(b"tkhd")
    data[track + 80 : track + 88] = bytes(8)  # tkhd width, height (16.16 fixed point; version 0 box)
    dst.write_bytes(bytes(data))


def make_bad_inputs(folder: Path, good: Path) -> dict[str, Expected]:
    """Write the bad inputs into `folder`; returns file name -> expected manifest outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    (folder / "empty.mp4").write_bytes(b"")
    expected["empty.mp4"] = Expected("failed", "empty file")

    (folder / "readme.mp4").write_text("not a video, just text with a video extension\n")
    expected["readme.mp4"] = Expected("failed", "not a video")

    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    expected["truncated.mp4"] = Expected("failed", "not a video")

    _audio_only(folder / "audio_only.mp4")
    expected["audio_only.mp4"] = Expected("failed", "no video stream")

    render_video(folder / "too_short.mp4", seconds=0.4, fps=25, width=128, height=96, shots=1, seed=5)
    expected["too_short.mp4"] = Expected("filtered", "too short")

    render_video(folder / "one_frame.mp4", seconds=0.04, fps=25, width=128, height=96, shots=1, seed=6)
    expected["one_frame.mp4"] = Expected("filtered", "too short")

    long_video = render_video(folder / ".long.mp4", seconds=8, fps=25, width=320, height=240, shots=4, seed=7)
    _corrupt_middle(long_video.path, folder / "corrupt_middle.mp4")
    long_video.path.unlink()
    expected["corrupt_middle.mp4"] = Expected("failed", "corrupt video data")

    render_video(folder / "locked.mp4", seconds=2.5, fps=25, width=160, height=128, shots=1, seed=8)
    os.chmod(folder / "locked.mp4", 0)
    expected["locked.mp4"] = Expected("failed", "permission denied", root_can_read=False)

    for seed, name in enumerate(
        ("with spaces and (parens).mp4", "vidéo_ñ_日本語.mp4", "it's $(echo pwned) `x` ; & |.mp4")
    ):
        render_video(folder / name, seconds=2.5, fps=25, width=160, height=128, shots=1, seed=20 + seed)
        expected[name] = Expected("kept", "")

    os.symlink("link loop.mp4", folder / "link loop.mp4")
    expected["link loop.mp4"] = Expected("failed", "symbolic link loop")
    os.symlink("moved away.mp4", folder / "dangling link.mp4")
    expected["dangling link.mp4"] = Expected(
        "failed", "broken symbolic link: its target 'moved away.mp4' does not exist"
    )

    # A camera original: 4K, 10-bit HEVC; and a 4K ProRes 422 edit export (two frames: too short, but read).
    _encode(
        folder / "camera 4k hevc 10bit.mp4",
        "libx265",
        3840,
        2160,
        "yuv420p10le",
        12,
        preset="ultrafast",
        **{"x265-params": "log-level=error"},
    )
    expected["camera 4k hevc 10bit.mp4"] = Expected("kept", "")
    _encode(folder / "edit 4k prores.mov", "prores_ks", 3840, 2160, "yuv422p10le", 2, profile="1")
    expected["edit 4k prores.mov"] = Expected("filtered", "too short")

    _encode(folder / "odd size 161x121.mp4", "libx264", 161, 121, "yuv444p", 20)  # 4:4:4 allows odd sizes
    expected["odd size 161x121.mp4"] = Expected("kept", "")
    _zero_size_header(folder / "odd size 161x121.mp4", folder / "zero size header.mp4")
    expected["zero size header.mp4"] = Expected("kept", "")

    _rewrite_without_timestamps(good, folder / "zero_timestamps.mp4")
    expected["zero_timestamps.mp4"] = Expected("kept", "")

    # `folder` sorts after the good videos, so this copy is the second of its sha256 and the duplicate.
    shutil.copy(good, folder / "copy of a good video.mp4")
    expected["copy of a good video.mp4"] = Expected("filtered", "duplicate source")
    return expected
