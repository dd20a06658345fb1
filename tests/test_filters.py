"""Filters are pure: rows and thresholds in, statuses and reasons out."""

from __future__ import annotations

import numpy as np
import pytest

from vidtune.tasks.filters import FilterParams, apply_filters, near_duplicates
from vidtune.tasks.records import ClipRecord, Status


def _row(clip_id, clip_score=0.3, motion=2.0, caption="a cat", start=0, **scores):
    return ClipRecord(
        clip_id=clip_id,
        source="s.mp4",
        source_sha256="x",
        start_frame=start,
        caption=caption,
        clip_score=clip_score,
        motion_score=motion,
        **scores,
    )


def test_each_threshold_filters_with_its_reason():
    rows = [
        _row("ok"),
        _row("low", clip_score=0.1),
        _row("still", motion=0.1),
        _row("shaky", motion=50),
        _row("mute", caption="  "),
    ]
    params = FilterParams(min_clip_score=0.2, min_motion=0.5, max_motion=30)
    out = {r.clip_id: r for r in apply_filters(rows, params)}
    assert out["ok"].status == Status.KEPT
    assert out["low"].reason.startswith("low clip score: 0.100 < filters.min_clip_score 0.2")
    assert out["still"].reason.startswith("static: motion 0.10")
    assert out["shaky"].reason.startswith("too much motion")
    assert out["mute"].reason.startswith("empty caption")


def test_text_overlays_and_low_aesthetic_scores_filter_with_their_reasons():
    rows = [
        _row("clean", text_area=0.4, aesthetic_score=5.5),
        _row("subtitled", text_area=12.34, aesthetic_score=5.5),
        _row("dull", text_area=0.0, aesthetic_score=3.21),
        _row("unscored"),  # the scores were off when it was curated: nothing to filter on
    ]
    out = {r.clip_id: r for r in apply_filters(rows, FilterParams(max_text_area=5, min_aesthetic=4.5))}
    assert out["subtitled"].reason == "text overlay: 12.3 % of the frame is text > filters.max_text_area 5 %"
    assert out["dull"].reason == "low aesthetic score: 3.21 < filters.min_aesthetic 4.5"
    assert out["clean"].status == out["unscored"].status == Status.KEPT
    assert all(r.status == Status.KEPT for r in apply_filters(rows, FilterParams()))  # both off by default


def test_score_only_filters_nothing():
    rows = [_row("low", clip_score=0.0, motion=0.0, caption="")]
    assert apply_filters(rows, FilterParams(min_clip_score=0.5, score_only=True))[0].status == Status.KEPT


def test_failed_and_source_rows_are_left_alone():
    failed = ClipRecord(
        clip_id="f", source="s", source_sha256="x", status=Status.FAILED, reason="frames could not be sampled"
    )
    source = ClipRecord(clip_id=None, source="s", source_sha256=None, status=Status.FAILED, reason="not a video")
    assert apply_filters([failed, source], FilterParams(min_motion=1)) == [failed, source]


def test_near_duplicates_keep_the_first_of_each_group():
    e = np.array([[1, 0, 0], [0.999, 0.04, 0], [0, 1, 0], [0, 0.999, 0.04], [0, 0, 1]], np.float32)
    assert near_duplicates(list("abcde"), e, threshold=0.99) == {"b": "a", "d": "c"}


def test_dedup_reason_names_the_kept_clip():
    rows = [_row("a", start=0), _row("b", start=10), _row("c", start=20)]
    vectors = {"a": np.array([1, 0]), "b": np.array([1, 0.01]), "c": np.array([0, 1])}
    out = apply_filters(rows, FilterParams(dedup_threshold=0.98), lambda r: vectors[r.clip_id])
    assert [r.reason for r in out] == ["", "duplicate_of:a", ""]


def test_min_motion_above_max_is_rejected():
    with pytest.raises(ValueError, match=r"min_motion \(5.0\) must not be greater than max_motion \(1.0\)"):
        FilterParams(min_motion=5, max_motion=1)
