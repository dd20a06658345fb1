"""Single-pass extraction: decode a source once, detect boundaries on thumbnails while buffering working-size
frames of the open run, and encode each clip as soon as its span is final: its bars cropped, at the training size
closest to its picture's aspect ratio."""

from __future__ import annotations

import math
from pathlib import Path

import av
import cv2
import numpy as np

from vidtune.tasks.bars import Crop, black_level, detect_active_area
from vidtune.tasks.clips import (
    ClipBuffer,
    ClipParams,
    ColorTags,
    FrameResampler,
    WorkingFrame,
    choose_size,
    encode_clip,
    low_resolution_reason,
    to_training_frame,
    to_working_frame,
    working_size,
)
from vidtune.tasks.probe import ProbeResult
from vidtune.tasks.records import ClipRecord, Source, SourceResult, Status, clip_id_for
from vidtune.tasks.scenes import BoundaryDetector, ClipPlanner, SceneParams

MAX_FRAME_GAP_S = 2.0  # longer gaps between consecutive frames are treated as a cut
BAR_SAMPLE_FRAMES = 8  # frames of a clip that vote on its bars


def detection_thumbnail(frame: av.VideoFrame, target_width: int) -> np.ndarray:
    """A BGR thumbnail about `target_width` wide for boundary detection.

    4:2:0 frames are point-sampled straight from their planes and only the thumbnail is colour-converted: 5-10x
    cheaper than a scaler pass over the full frame, and cut detection compares thumbnails with each other, so
    the missing low-pass filter does not matter. Other pixel formats go through swscale.
    """
    step = frame.width // target_width
    if frame.format.name not in ("yuv420p", "yuvj420p") or step < 2:
        width = min(target_width, frame.width)
        height = max(2, round(frame.height * width / frame.width / 2) * 2)
        return frame.to_ndarray(width=width, height=height, format="bgr24", interpolation="FAST_BILINEAR")
    y, u, v = (_plane(frame, i, full)[::step, ::step] for i, full in ((0, True), (1, False), (2, False)))
    h, w = (min(y.shape[0], 2 * u.shape[0]) // 2) * 2, (min(y.shape[1], 2 * u.shape[1]) // 2) * 2
    packed = np.concatenate([y[:h, :w].ravel(), u[: h // 2, : w // 2].ravel(), v[: h // 2, : w // 2].ravel()])
    return cv2.cvtColor(packed.reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)


def _plane(frame: av.VideoFrame, index: int, full_size: bool) -> np.ndarray:
    plane = frame.planes[index]
    h, w = (frame.height, frame.width) if full_size else (frame.height // 2, frame.width // 2)
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w]


def decoded_frames(container, stream):
    """Yield (frame, None) or (None, error message): a corrupt packet or frame is reported, decoding goes on."""
    for packet in container.demux(stream):
        try:
            for frame in packet.decode():
                yield (None, "frame flagged corrupt by the decoder") if frame.is_corrupt else (frame, None)
        except av.error.InvalidDataError as exc:
            yield None, exc.strerror or str(exc)


class SourceExtractor:
    """Consumes one source's decoded frames in order and writes its clips to `out_dir`."""

    def __init__(
        self, source: Source, probe: ProbeResult, scenes: SceneParams, clips: ClipParams, out_dir: Path, sample=None
    ):
        self.source, self.probe, self.scenes, self.clips, self.out_dir = source, probe, scenes, clips, out_dir
        self.sample = sample  # (images, fps) -> SampledFrames for the scores, while the frames are at hand
        self.sampled: dict = {}
        fps = probe.fps
        self.detector = BoundaryDetector(scenes, fps)
        max_len = max(1, math.floor(scenes.max_clip_s * fps + 1e-6))
        min_len = min(max_len, max(1, math.ceil(scenes.min_clip_s * fps - 1e-6)))
        self.planner = ClipPlanner(min_len=min_len, max_len=max_len, trim=scenes.trim_frames)
        self.sizes = clips.sizes()
        self.working_size = working_size(*probe.display_size, self.sizes)
        self.resampler = FrameResampler(clips.fps)
        self.buffer = ClipBuffer.empty()
        self.times: list[float] = []  # presentation time of every decoded frame
        self.records: list[ClipRecord] = []
        self.error_messages: list[str] = []
        self.error_times: list[float] = []
        self._previous: tuple[int, av.VideoFrame, float] | None = None  # grid points known once the next arrives
        self._color = ColorTags()  # the source's colour description, carried into every clip
        self._recovering = False  # after corruption, frames are damaged until the next keyframe

    # ----------------------------------------------------------------------------------------- events

    def add_error(self, message: str) -> None:
        self.error_messages.append(message)
        self.error_times.append(self.times[-1] - self.times[0] if self.times else 0.0)
        self._recovering = True

    def add_frame(self, frame: av.VideoFrame) -> None:
        t = frame.time
        if t is None or (self.times and t <= self.times[-1]):  # missing or non-increasing: assume the rate
            t = self.times[-1] + 1 / self.probe.fps if self.times else 0.0
        jump = bool(self.times) and t - self.times[-1] > MAX_FRAME_GAP_S
        if jump:  # a frozen stream or a timestamp glitch: a boundary, and the frame before it is not stretched
            t_shown = self.times[-1] + 1 / self.probe.fps
            self._buffer_previous(shown_until=t_shown)
            self._previous = None
        cut_before = (self._recovering and frame.key_frame) or jump  # the gap left by corruption is a boundary
        usable = not self._recovering or frame.key_frame
        self._recovering = self._recovering and not frame.key_frame
        if self._previous is not None:
            self._buffer_previous(shown_until=t)
        small = detection_thumbnail(frame, self.scenes.detect_width)
        self._plan(self.detector.push(small, usable=usable, cut_before=cut_before))
        self._previous = (len(self.times), frame, t)
        self.times.append(t)

    def finish(self) -> list[ClipRecord]:
        if self._previous is not None:
            self._buffer_previous(shown_until=self._previous[2] + 1 / self.probe.fps)
        self._plan(self.detector.finish())
        self._write(self.planner.finish())
        return self.records + self._source_rows()

    @property
    def duration_s(self) -> float:
        return self._clip_time(len(self.times)) if self.times else 0.0

    # ----------------------------------------------------------------------------------------- internals

    def _buffer_previous(self, shown_until: float) -> None:
        index, frame, shown_from = self._previous
        repeats = self.resampler.grid_points(shown_from, shown_until)
        if repeats:
            image, self._color = to_working_frame(frame, self.probe.rotation, *self.working_size)
            self.buffer.add(index, image, repeats)

    def _plan(self, states) -> None:
        for state in states:
            self._write(self.planner.push(state.usable, state.cut_before))
        self.buffer.drop_before(self.planner.earliest_needed)

    def _clip_time(self, index: int) -> float:
        times = self.times
        return (times[index] if index < len(times) else times[-1] + 1 / self.probe.fps) - times[0]

    def _write(self, spans: list[tuple[int, int]]) -> None:
        clips = self.clips
        for start, end in spans:
            frames = self.buffer.take(start, end)
            if not frames:
                continue
            clip_id = clip_id_for(self.source.sha256, start, end)
            crop = self._picture(frames)
            picture = self._in_source_pixels(crop)
            size = choose_size(picture.width, picture.height, self.sizes, clips.max_upscale)
            row = ClipRecord(
                clip_id=clip_id,
                source=self.source.path,
                source_sha256=self.source.sha256,
                start_s=round(self._clip_time(start), 4),
                end_s=round(self._clip_time(end), 4),
                start_frame=start,
                end_frame=end,
                num_frames=len(frames),
                fps=clips.fps,
                crop_left=picture.left,
                crop_top=picture.top,
                active_width=picture.width,
                active_height=picture.height,
            )
            self.records.append(row)
            if size is None:  # not blown up: a filtered row, nothing encoded
                row.status = Status.FILTERED
                row.reason = low_resolution_reason(picture.width, picture.height, self.sizes, clips.max_upscale)
                continue
            row.width, row.height = size
            framed = {id(frame): to_training_frame(frame, crop, *size) for frame in frames}  # a repeated frame once
            images = [framed[id(frame)] for frame in frames]
            encode_clip(images, self.out_dir / f"{clip_id}.mp4", clips.fps, clips, self._color)
            if self.sample is not None:
                self.sampled[clip_id] = self.sample(images, clips.fps, self._color)

    def _picture(self, frames: list[WorkingFrame]) -> Crop:
        """The clip's picture inside its bars (working-frame pixels, even), or the whole frame."""
        width, height = self.working_size
        if not self.clips.crop_bars:
            return Crop.full(width, height)
        voters = frames[:: max(1, len(frames) // BAR_SAMPLE_FRAMES)][:BAR_SAMPLE_FRAMES]
        crop = detect_active_area([f.y for f in voters], black_level(self._color.color_range), self.clips.bar_threshold)
        return crop.even()

    def _in_source_pixels(self, crop: Crop) -> Crop:
        display_w, display_h = self.probe.display_size
        width, height = self.working_size
        if crop.is_full(width, height):
            return Crop.full(display_w, display_h)
        return crop.scaled(display_w / width, display_h / height)

    def _source_rows(self) -> list[ClipRecord]:
        """A failed row for corruption (clips from intact stretches stay), or a filtered row if nothing was usable."""
        width, height = self.probe.display_size
        facts = dict(fps=self.probe.fps, width=width, height=height, end_s=round(self.duration_s, 4))
        if self.error_messages:
            first, last = min(self.error_times), max(self.error_times)
            reason = (
                f"corrupt video data: {len(self.error_messages)} decode error(s) between {first:.2f} s and {last:.2f} s "
                f"({self.error_messages[0]}); clips were taken only from intact stretches"
            )
            return [
                ClipRecord.for_source(self.source, Status.FAILED, reason, **{**facts, "start_s": first, "end_s": last})
            ]
        if not self.records:
            reason = (
                f"no usable stretch of at least scenes.min_clip_s = {self.scenes.min_clip_s} s between cuts, fades "
                f"and blank frames in {self.duration_s:.2f} s ({len(self.times)} frames)"
            )
            return [ClipRecord.for_source(self.source, Status.FILTERED, reason, **facts)]
        return []


def extract_clips(
    source: Source, probe: ProbeResult, scenes: SceneParams, clips: ClipParams, out_dir: Path, sample=None
) -> SourceResult:
    """Decode `source` once and write its clips (rows, duration and detected boundaries in the result; with
    `sample`, the frames the scores read, taken from each clip as it is written)."""
    extractor = SourceExtractor(source, probe, scenes, clips, out_dir, sample)
    with av.open(source.local_path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame, error in decoded_frames(container, stream):
            extractor.add_frame(frame) if error is None else extractor.add_error(error)
    rows = extractor.finish()
    detector = extractor.detector
    return SourceResult(
        rows, False, extractor.duration_s, sorted(set(detector.cuts)), detector.gradual, extractor.sampled
    )
