"""Filters over scored clips: pure functions from rows (and embeddings) to rows with final statuses.

They run at the end of every curate run on the staged scores, so changing a threshold needs no re-extraction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.tasks.records import ClipRecord, Status


class FilterParams(BaseModel):
    """Thresholds that decide which scored clips are kept."""

    model_config = ConfigDict(extra="forbid")

    min_clip_score: float | None = Field(
        None, description="Drop clips whose caption matches worse (CLIP cosine); ~0.2 for ViT-B-32 with real captions."
    )
    min_motion: float | None = Field(0.5, ge=0, description="Drop static clips: flow below this % of width per second.")
    max_motion: float | None = Field(None, ge=0, description="Drop clips moving faster than this (shaky, flashing).")
    max_text_area: float | None = Field(
        None, ge=0, le=100, description="Drop clips with text overlays (subtitles, logos) over this % of the frame."
    )
    min_aesthetic: float | None = Field(
        None,
        description="Drop clips the LAION aesthetic predictor scores below this (about 1-10; LAION's subsets: 5, 6).",
    )
    dedup_threshold: float | None = Field(
        None, gt=0, le=1, description="Keep one of each group of clips whose CLIP embeddings have cosine >= this."
    )
    score_only: bool = Field(False, description="Record scores and filter nothing.")

    @model_validator(mode="after")
    def _motion_range(self) -> FilterParams:
        if self.min_motion is not None and self.max_motion is not None and self.min_motion > self.max_motion:
            raise ValueError(f"min_motion ({self.min_motion}) must not be greater than max_motion ({self.max_motion})")
        return self


def filter_reason(row: ClipRecord, params: FilterParams) -> str | None:
    """Why a scored clip is filtered, or None to keep it."""
    if not row.caption.strip():
        return "empty caption: no caption text for this clip (see captions.mode / captions.template)"
    if params.min_clip_score is not None and row.clip_score is not None and row.clip_score < params.min_clip_score:
        return f"low clip score: {row.clip_score:.3f} < filters.min_clip_score {params.min_clip_score}"
    if params.min_motion is not None and row.motion_score is not None and row.motion_score < params.min_motion:
        return f"static: motion {row.motion_score:.2f} < filters.min_motion {params.min_motion}"
    if params.max_motion is not None and row.motion_score is not None and row.motion_score > params.max_motion:
        return f"too much motion: {row.motion_score:.2f} > filters.max_motion {params.max_motion}"
    if params.max_text_area is not None and row.text_area is not None and row.text_area > params.max_text_area:
        return f"text overlay: {row.text_area:.1f} % of the frame is text > filters.max_text_area {params.max_text_area:g} %"
    if (
        params.min_aesthetic is not None
        and row.aesthetic_score is not None
        and row.aesthetic_score < params.min_aesthetic
    ):
        return f"low aesthetic score: {row.aesthetic_score:.2f} < filters.min_aesthetic {params.min_aesthetic:g}"
    return None


def near_duplicates(ids: list[str], embeddings: np.ndarray, threshold: float) -> dict[str, str]:
    """clip id -> id of the earlier clip it duplicates (cosine >= threshold), scanning `ids` in order."""
    unit = embeddings.astype(np.float32)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-8)
    kept: list[int] = []
    duplicate_of: dict[str, str] = {}
    for i in range(len(ids)):
        if kept:
            sims = unit[kept] @ unit[i]
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                duplicate_of[ids[i]] = ids[kept[best]]
                continue
        kept.append(i)
    return duplicate_of


def apply_filters(rows: list[ClipRecord], params: FilterParams, embedding_of=None) -> list[ClipRecord]:
    """Final statuses: scored candidates that fail a threshold become `filtered` with the reason."""
    if params.score_only:
        return rows
    result = []
    for row in rows:
        reason = filter_reason(row, params) if row.clip_id and row.status == Status.KEPT else None
        result.append(dataclasses.replace(row, status=Status.FILTERED, reason=reason) if reason else row)
    if params.dedup_threshold is not None and embedding_of is not None:
        candidates = sorted(
            (r for r in result if r.clip_id and r.status == Status.KEPT and r.clip_score is not None),
            key=lambda r: (r.source, r.start_frame),
        )
        if candidates:
            vectors = np.stack([embedding_of(r) for r in candidates])
            duplicates = near_duplicates([r.clip_id for r in candidates], vectors, params.dedup_threshold)
            result = [
                dataclasses.replace(r, status=Status.FILTERED, reason=f"duplicate_of:{duplicates[r.clip_id]}")
                if r.clip_id in duplicates
                else r
                for r in result
            ]
    return result
