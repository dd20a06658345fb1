"""Read a source's video metadata with PyAV, decoding one frame to prove it is really decodable."""

from __future__ import annotations

from dataclasses import dataclass

import av


class ProbeError(Exception):
    """The file is not a usable video; the message is the manifest reason."""


@dataclass(frozen=True)
class ProbeResult:
    duration_s: float
    fps: float  # average frame rate
    vfr: bool
    width: int  # coded size
    height: int
    rotation: int  # degrees counter-clockwise to display upright
    codec: str
    frame_count: int  # from the container; 0 when unknown

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


def probe_video(path: str) -> ProbeResult:
    try:
        container = av.open(path)
    except av.error.InvalidDataError:
        raise ProbeError("not a video: the container could not be parsed (truncated file or not a media file)")
    except av.error.FFmpegError as exc:
        raise ProbeError(f"cannot open as video: {exc.strerror or exc}") from exc
    with container:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise ProbeError(f"no video stream (streams present: {kinds})")
        stream = container.streams.video[0]
        first = _first_frame(container, stream)
        fps = _sane_rate(stream)
        base = float(stream.base_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise ProbeError("no frame rate: the stream has no timing information")
        # Broken muxers write tiny durations; a known frame count at a sane rate is the better witness.
        duration = max(_duration_s(container, stream), (stream.frames or 0) / fps)
        # The decoded frame is the witness for the size: headers may say 0 x 0 (or something else) when the
        # bitstream knows better.
        width, height = first.width or stream.codec_context.width, first.height or stream.codec_context.height
        if not width or not height:
            raise ProbeError(f"no frame size: the stream decodes to {width} x {height} pixels")
        return ProbeResult(
            duration_s=duration,
            fps=fps,
            vfr=bool(base) and abs(base - fps) / base > 0.01,
            width=width,
            height=height,
            rotation=int(round((first.rotation or 0) / 90)) * 90 % 360,  # matrices store e.g. 89.99
            codec=stream.codec_context.name,
            frame_count=int(stream.frames or 0),
        )


MAX_SANE_FPS = 240.0


def _sane_rate(stream) -> float:
    """The first plausible frame rate among the container's claims (broken files report e.g. 1875 fps)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.codec_context.framerate, stream.base_rate):
        if rate and 0 < float(rate) <= MAX_SANE_FPS:
            return float(rate)
    return 0.0


def _first_frame(container, stream) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        raise ProbeError(f"video stream does not decode: {exc.strerror or exc}") from exc
    raise ProbeError("video stream has no decodable frames")


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0
