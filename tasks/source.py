"""One source video in, manifest rows out: probe, detect boundaries and extract clips in a single decode pass.

Clips are staged under `staging/<sha256>/` and the source's rows are written last (`rows.json`), so a source
counts as done only once all its clips are on disk; a rerun skips it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import av

from tasks.annotate import annotate_clips
from tasks.captions import CaptionParams
from tasks.clips import ClipBuffer, ClipParams, FrameResampler, encode_clip, to_training_frame
from tasks.files import write_json_atomic
from tasks.probe import ProbeError, ProbeResult, probe_video
from tasks.records import ClipRecord, Source, Status, clip_id_for
from tasks.scenes import BoundaryDetector, ClipPlanner, SceneParams
from tasks.scoring import ScoreParams

log = logging.getLogger(__name__)
ROWS_FILE = "rows.json"


@dataclass
class SourceResult:
    rows: list[ClipRecord]
    resumed: bool = False  # rows came from an earlier run's staging
    duration_s: float = 0.0
    cuts: list[int] = field(default_factory=list)  # detected hard cuts (first frame of the new shot)
    gradual: list[tuple[int, int]] = field(default_factory=list)  # detected fades/dissolves (inclusive)


@dataclass(frozen=True)
class SourceSettings:
    """The slices of CurateParams that shape one source's rows (thresholds are applied later, for all)."""

    scenes: SceneParams
    clips: ClipParams
    captions: CaptionParams
    scores: ScoreParams


def curate_source(source: Source, settings: SourceSettings, staging_root: Path) -> SourceResult:
    """Rows for one source: its captioned, scored clips (staged as MP4 + embedding) or one row saying why it
    was filtered or failed."""
    if source.error:
        return SourceResult([ClipRecord.for_source(source, Status.FAILED, source.error)])
    if source.duplicate_of:
        reason = f"duplicate source: same sha256 as {source.duplicate_of}"
        return SourceResult([ClipRecord.for_source(source, Status.FILTERED, reason)])
    staging = staging_root / source.sha256
    done = staging / ROWS_FILE
    if done.exists():
        saved = json.loads(done.read_text())
        rows = [ClipRecord.from_dict(r) for r in saved["rows"]]
        return SourceResult(rows, True, saved["duration_s"], saved["cuts"], [tuple(g) for g in saved["gradual"]])
    if staging.exists():  # a run died inside this source: start it over
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    result = _curate_new_source(source, settings.scenes, settings.clips, staging)
    _annotate(result.rows, staging, source, settings)
    rows = [r.to_dict() for r in result.rows]
    write_json_atomic(
        done,
        {"source": source.path, "duration_s": result.duration_s, "cuts": result.cuts, "gradual": result.gradual, "rows": rows},
    )
    return result


def _annotate(rows: list[ClipRecord], staging: Path, source: Source, settings: SourceSettings) -> None:
    try:
        annotate_clips(rows, staging, source.sidecar, settings.captions, settings.scores)
    except (RuntimeError, ValueError) as exc:  # a model failing on this source's clips fails only its clips
        log.exception("captioning/scoring failed for %s", source.path)
        for row in rows:
            if row.clip_id and row.status == Status.KEPT:
                row.status, row.reason = Status.FAILED, f"captioning/scoring failed: {type(exc).__name__}: {exc}"


def _curate_new_source(source: Source, scenes: SceneParams, clips: ClipParams, staging: Path) -> SourceResult:
    try:
        probe = probe_video(source.local_path)
    except ProbeError as exc:
        return SourceResult([ClipRecord.for_source(source, Status.FAILED, str(exc))])
    facts = dict(fps=probe.fps, width=probe.display_size[0], height=probe.display_size[1], end_s=probe.duration_s)
    if 0 < probe.duration_s < scenes.min_clip_s:
        reason = f"too short: {probe.duration_s:.2f} s is under scenes.min_clip_s = {scenes.min_clip_s} s"
        return SourceResult([ClipRecord.for_source(source, Status.FILTERED, reason, **facts)], False, probe.duration_s)
    try:
        return extract_clips(source, probe, scenes, clips, staging)
    except av.error.FFmpegError as exc:
        reason = f"decoding failed: {exc.strerror or exc}"
    except (ValueError, RuntimeError, MemoryError) as exc:  # a broken file must not stop the other sources
        log.exception("extraction failed for %s", source.path)
        reason = f"extraction failed: {type(exc).__name__}: {exc}"
    return SourceResult([ClipRecord.for_source(source, Status.FAILED, reason, **facts)], False, probe.duration_s)


@dataclass
class _DecodeErrors:
    messages: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def reason(self) -> str:
        first, last = min(self.times), max(self.times)
        return (
            f"corrupt video data: {len(self.messages)} decode error(s) between {first:.2f} s and {last:.2f} s "
            f"({self.messages[0]}); clips were taken only from intact stretches"
        )


def _decoded_frames(container, stream):
    """Yield (frame, None) or (None, error): a corrupt packet is reported and decoding goes on."""
    for packet in container.demux(stream):
        try:
            for frame in packet.decode():
                yield frame, None
        except av.error.InvalidDataError as exc:
            yield None, exc


def extract_clips(
    source: Source, probe: ProbeResult, scenes: SceneParams, clips: ClipParams, out_dir: Path
) -> SourceResult:
    """Decode the source once; detect boundaries on small frames while buffering training-size frames of the
    open run; encode each clip as soon as its span is final."""
    fps = probe.fps
    detector = BoundaryDetector(scenes, fps)
    planner = ClipPlanner(
        min_len=max(1, math.ceil(scenes.min_clip_s * fps - 1e-6)),
        max_len=max(1, math.floor(scenes.max_clip_s * fps + 1e-6)),
        trim=scenes.trim_frames,
    )
    resampler = FrameResampler(clips.fps)
    buffer = ClipBuffer.empty()
    times: list[float] = []
    errors = _DecodeErrors()
    records: list[ClipRecord] = []
    detect_w = min(scenes.detect_width, probe.width)
    detect_h = max(2, round(probe.height * detect_w / probe.width / 2) * 2)

    def clip_time(index: int) -> float:
        return (times[index] if index < len(times) else times[-1] + 1 / fps) - times[0]

    def write_spans(spans: list[tuple[int, int]]) -> None:
        for start, end in spans:
            images = buffer.take(start, end)
            if not images:
                continue
            clip_id = clip_id_for(source.sha256, start, end)
            encode_clip(images, out_dir / f"{clip_id}.mp4", clips.fps, clips)
            records.append(
                ClipRecord(
                    clip_id=clip_id, source=source.path, source_sha256=source.sha256,
                    start_s=round(clip_time(start), 4), end_s=round(clip_time(end), 4),
                    start_frame=start, end_frame=end, num_frames=len(images),
                    fps=clips.fps, width=clips.width, height=clips.height,
                )
            )  # fmt: skip

    def plan(states) -> None:
        for state in states:
            write_spans(planner.push(state.usable, state.cut_before))
        buffer.drop_before(planner.earliest_needed)

    previous = None  # (index, frame, time): a frame's grid points are known once the next frame arrives
    recovering = False
    with av.open(source.local_path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame, error in _decoded_frames(container, stream):
            if error is None and frame.is_corrupt:
                error = "frame flagged corrupt by the decoder"
            if error is not None:
                errors.messages.append(error if isinstance(error, str) else error.strerror or str(error))
                errors.times.append((times[-1] - times[0]) if times else 0.0)
                recovering = True
                continue
            t = frame.time
            if t is None or (times and t <= times[-1]):  # missing or non-increasing timestamps: assume the rate
                t = times[-1] + 1 / fps if times else 0.0
            # After corruption, frames are damaged until the next keyframe; the gap itself is a boundary.
            cut_before = recovering and frame.key_frame
            usable = not recovering or frame.key_frame
            recovering = recovering and not frame.key_frame
            if previous is not None:
                repeats = resampler.grid_points(previous[2], t)
                if repeats:
                    buffer.add(previous[0], to_training_frame(previous[1], probe.rotation, clips.width, clips.height), repeats)
            # Detection only needs a thumbnail: the fast scaler is 5x cheaper than AREA and loses nothing here.
            small = frame.to_ndarray(width=detect_w, height=detect_h, format="bgr24", interpolation="FAST_BILINEAR")
            plan(detector.push(small, usable=usable, cut_before=cut_before))
            previous = (len(times), frame, t)
            times.append(t)
    if previous is not None:
        repeats = resampler.grid_points(previous[2], previous[2] + 1 / fps)
        buffer.add(previous[0], to_training_frame(previous[1], probe.rotation, clips.width, clips.height), repeats)
    plan(detector.finish())
    write_spans(planner.finish())

    duration = clip_time(len(times)) if times else 0.0
    facts = dict(fps=fps, width=probe.display_size[0], height=probe.display_size[1], end_s=round(duration, 4))
    if errors.messages:
        first, last = min(errors.times), max(errors.times)
        records.append(
            ClipRecord.for_source(source, Status.FAILED, errors.reason(), **{**facts, "start_s": first, "end_s": last})
        )
    elif not records:
        reason = (
            f"no usable stretch of at least scenes.min_clip_s = {scenes.min_clip_s} s between cuts, fades and "
            f"blank frames in {duration:.2f} s ({len(times)} frames)"
        )
        records.append(ClipRecord.for_source(source, Status.FILTERED, reason, **facts))
    return SourceResult(records, False, duration, sorted(set(detector.cuts)), detector.gradual)
