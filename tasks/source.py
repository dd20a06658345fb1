"""One source video in, manifest rows out: probe, detect boundaries and extract clips in a single decode pass.

Clips are staged under `staging/<sha256>/` and the source's rows are written last (`rows.json`), so a source
counts as done only once all its clips are on disk; a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import av

from vidtune.tasks.annotate import annotate_clips, frames_per_clip
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams, choose_size, low_resolution_reason, yuv_to_rgb
from vidtune.tasks.extract import extract_clips
from vidtune.tasks.files import write_json_atomic
from vidtune.tasks.images import extract_image, is_image
from vidtune.tasks.probe import ProbeError, probe_video
from vidtune.tasks.records import ClipRecord, Source, SourceResult, Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams, sample_images

log = logging.getLogger(__name__)
ROWS_FILE = "rows.json"


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
        if saved.get("sidecar") == source.sidecar:  # a changed sidecar caption means new captions and scores
            # Same bytes, maybe a new name or place: rows follow the path of this run.
            rows = [dataclasses.replace(ClipRecord.from_dict(r), source=source.path) for r in saved["rows"]]
            return SourceResult(rows, True, saved["duration_s"], saved["cuts"], [tuple(g) for g in saved["gradual"]])
    if staging.exists():  # a run died inside this source: start it over
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    result = _curate_new_source(source, settings, staging)
    # Model errors (out of memory, a tokenizer failing) propagate: the task fails, nothing is marked done, and
    # the source is a failed row in this run's manifest and retried by the next run.
    annotate_clips(result.rows, staging, source.sidecar, settings.captions, settings.scores, result.sampled)
    result.sampled = {}  # the frames are done with; the result travels back to the flow
    rows = [r.to_dict() for r in result.rows]
    write_json_atomic(
        done,
        {
            "source": source.path,
            "sidecar": source.sidecar,
            "duration_s": result.duration_s,
            "cuts": result.cuts,
            "gradual": result.gradual,
            "rows": rows,
        },
    )
    return result


def _sampler(settings: SourceSettings):
    """What the scores read of each clip, taken from its frames while it is written (decoding the staged MP4
    again cost ~12 % of curation's CPU); None when no score or captioner reads frames."""
    scores, captions = settings.scores, settings.captions
    if not (scores.clip or scores.motion or captions.mode == "vlm"):
        return None
    per_clip = frames_per_clip(captions, scores)

    def sample(images, fps, color):
        return sample_images(images, fps, per_clip, scores.motion_fps, lambda packed: yuv_to_rgb(packed, color))

    return sample


def _curate_new_source(source: Source, settings: SourceSettings, staging: Path) -> SourceResult:
    scenes, clips = settings.scenes, settings.clips
    if is_image(source.path):
        return extract_image(source, clips, staging, _sampler(settings))
    try:
        probe = probe_video(source.local_path)
    except ProbeError as exc:
        return SourceResult([ClipRecord.for_source(source, Status.FAILED, str(exc))])
    facts = dict(fps=probe.fps, width=probe.display_size[0], height=probe.display_size[1], end_s=probe.duration_s)
    if 0 < probe.duration_s < scenes.min_clip_s:
        reason = f"too short: {probe.duration_s:.2f} s is under scenes.min_clip_s = {scenes.min_clip_s} s"
        return SourceResult([ClipRecord.for_source(source, Status.FILTERED, reason, **facts)], False, probe.duration_s)
    sizes = clips.sizes()
    if choose_size(*probe.display_size, sizes, clips.max_upscale) is None:  # even with no bars: not decoded
        reason = low_resolution_reason(*probe.display_size, sizes, clips.max_upscale)
        return SourceResult([ClipRecord.for_source(source, Status.FILTERED, reason, **facts)], False, probe.duration_s)
    try:
        return extract_clips(source, probe, scenes, clips, staging, _sampler(settings))
    except av.error.FFmpegError as exc:
        reason = f"decoding failed: {exc.strerror or exc}"
    except ValueError as exc:  # a file that breaks the extractor must not stop the other sources
        log.exception("extraction failed for %s", source.path)
        reason = f"extraction failed: {type(exc).__name__}: {exc}"
    return SourceResult([ClipRecord.for_source(source, Status.FAILED, reason, **facts)], False, probe.duration_s)
