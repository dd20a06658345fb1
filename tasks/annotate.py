"""Caption and score the clips of one source (after extraction, before its rows are marked done)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vidtune.tasks.aesthetic import AestheticHead
from vidtune.tasks.captions import CaptionParams, ClipFrames, VlmCaptioner, render_caption
from vidtune.tasks.files import atomic_path
from vidtune.tasks.ocr import TextAreaScorer
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.report import SHEET_FRAMES, sheet_path, tile_sheet
from vidtune.tasks.scoring import (
    ClipScorer,
    FramesUnavailable,
    ScoreParams,
    cached_model,
    evenly_spaced,
    local_version,
    motion_score,
    resolve_device,
    sample_frames,
)

CLIP_BATCH = 64  # clips per CLIP forward pass (frames x clips images)


@dataclass(frozen=True)
class Annotators:
    """The models one worker uses; built once per process through `cached_model`."""

    captioner: VlmCaptioner | None
    clip: ClipScorer | None
    text: TextAreaScorer | None = None
    aesthetic: AestheticHead | None = None

    @classmethod
    def load(cls, captions: CaptionParams, scores: ScoreParams) -> Annotators:
        device = resolve_device(scores.device)
        captioner = None
        if captions.mode == "vlm":
            key = ("vlm", captions.vlm_model, local_version(captions.vlm_model), device)
            captioner = cached_model(key, lambda: VlmCaptioner(captions.vlm_model, device))
        clip = None
        if scores.clip:
            clip = load_clip_scorer(scores.clip_model, scores.clip_pretrained, device)
        return cls(captioner, clip, load_text_scorer(scores), load_aesthetic_head(scores, clip))


def load_clip_scorer(model: str, pretrained: str | None, device: str) -> ClipScorer:
    """The process's scorer for these weights. A weights file replaced in place is a new model: a warm worker must
    not keep scoring with the old one."""
    key = ("clip", model, pretrained, local_version(pretrained), device)
    return cached_model(key, lambda: ClipScorer(model, pretrained, device))


def load_text_scorer(scores: ScoreParams) -> TextAreaScorer | None:
    return cached_model(("text-area",), TextAreaScorer) if scores.text_area else None


def load_aesthetic_head(scores: ScoreParams, clip: ClipScorer | None) -> AestheticHead | None:
    """The head for `scores.aesthetic_head`, checked against the CLIP model's embedding size."""
    if not scores.aesthetic_head or clip is None:
        return None
    reference = scores.aesthetic_head
    head = cached_model(("aesthetic", reference, local_version(reference)), lambda: AestheticHead(reference))
    if clip.embed_dim is not None:
        head.check_embedding_dim(clip.embed_dim, scores.clip_model)
    return head


def _evenly(frames: np.ndarray, count: int) -> np.ndarray:
    return frames[evenly_spaced(len(frames), count)]


def embedding_path(clip_dir: Path, clip_id: str) -> Path:
    return clip_dir / f"{clip_id}.npy"


def frames_per_clip(captions: CaptionParams, scores: ScoreParams) -> int:
    """Evenly spaced frames per clip that captioning and the CLIP score read."""
    return max(scores.clip_frames, captions.vlm_frames if captions.mode == "vlm" else 1)


def annotate_clips(
    rows: list[ClipRecord],
    clip_dir: Path,
    sidecar: str | None,
    captions: CaptionParams,
    scores: ScoreParams,
    sampled: dict | None = None,
) -> list[ClipRecord]:
    """Fill caption and scores (clip, motion, text area, aesthetic) of the kept clip rows (in place); save CLIP
    embeddings.
    `sampled`: frames taken while the clips were written (`frames_per_clip` of them); others are read back.

    A clip whose frames cannot be read back becomes `failed` with the reason; the others go on.
    """
    annotators = Annotators.load(captions, scores)
    per_clip = frames_per_clip(captions, scores)
    sampled = dict(sampled or {})
    for row in (r for r in rows if r.clip_id and r.status == Status.KEPT and r.clip_id not in sampled):
        try:
            sampled[row.clip_id] = sample_frames(clip_dir / f"{row.clip_id}.mp4", row.fps, per_clip, scores.motion_fps)
        except FramesUnavailable as exc:
            row.status, row.reason = Status.FAILED, str(exc)
    ready = [r for r in rows if r.clip_id in sampled]
    if not ready:
        return rows
    for row in ready:  # report.html's thumbnails, from frames at hand
        frames = _evenly(sampled[row.clip_id].clip, SHEET_FRAMES if row.num_frames > 1 else 1)
        _save_bytes(sheet_path(clip_dir, row.clip_id), tile_sheet([Image.fromarray(f) for f in frames]))

    vlm_texts: list[str | None] = [None] * len(ready)
    if annotators.captioner:
        count = {r.clip_id: captions.vlm_frames if r.num_frames > 1 else 1 for r in ready}  # a still: one picture
        frames = [
            ClipFrames(list(_evenly(sampled[r.clip_id].clip, count[r.clip_id])), r.num_frames, r.fps) for r in ready
        ]
        vlm_texts = annotators.captioner.caption(
            frames, captions.vlm_prompt, captions.vlm_max_new_tokens, captions.vlm_batch_size
        )
    template = captions.template_for(has_sidecar=sidecar is not None)
    for row, vlm in zip(ready, vlm_texts):
        row.caption = render_caption(template, row, trigger=captions.trigger, sidecar=sidecar, vlm=vlm)

    if scores.motion:
        for row in (r for r in ready if r.media == "video"):  # a still has no motion to score
            s = sampled[row.clip_id]
            row.motion_score = round(motion_score(s.motion, s.motion_dt, scores.motion_width), 4)
    if annotators.text:
        for row in ready:
            row.text_area = round(annotators.text.score(_evenly(sampled[row.clip_id].clip, scores.clip_frames)), 3)
    if annotators.clip:
        for start in range(0, len(ready), CLIP_BATCH):
            batch = ready[start : start + CLIP_BATCH]
            frames = [_evenly(sampled[r.clip_id].clip, scores.clip_frames) for r in batch]
            clip_scores, embeddings = annotators.clip.score(frames, [r.caption for r in batch])
            for row, score, embedding in zip(batch, clip_scores, embeddings):
                row.clip_score = round(score, 5)
                _save_npy(embedding_path(clip_dir, row.clip_id), embedding)
            if annotators.aesthetic:
                for row, score in zip(batch, annotators.aesthetic.score(embeddings, scores.clip_model)):
                    row.aesthetic_score = round(score, 4)
    return rows


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    _save_bytes(path, buffer.getvalue())


def _save_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
