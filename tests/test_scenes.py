"""Scene boundaries and clip planning: pure functions, and detection scored against generated ground truth."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtune.tasks.clips import ClipParams
from vidtune.tasks.extract import extract_clips
from vidtune.tasks.probe import probe_video
from vidtune.tasks.records import Source
from vidtune.tasks.scenes import (
    ClipPlanner,
    SceneParams,
    colour_histogram,
    histogram_distance,
    plan_clip_spans,
)
from vidtune.tasks.synthetic_videos import render_video, score_cuts


def test_runs_are_trimmed_at_boundaries_but_not_at_the_video_edges():
    usable = [True] * 30
    assert plan_clip_spans(usable, {10}, min_len=3, max_len=100, trim=2) == [(0, 8), (12, 30)]


def test_unusable_frames_split_runs():
    usable = [True] * 10 + [False] * 5 + [True] * 10
    assert plan_clip_spans(usable, set(), min_len=3, max_len=100, trim=1) == [(0, 9), (16, 25)]


def test_long_shots_become_max_length_windows_and_short_remainders_are_dropped():
    assert plan_clip_spans([True] * 25, set(), min_len=4, max_len=10, trim=0) == [(0, 10), (10, 20), (20, 25)]
    assert plan_clip_spans([True] * 23, set(), min_len=4, max_len=10, trim=0) == [(0, 10), (10, 20)]


def test_shots_shorter_than_min_give_no_clip():
    assert plan_clip_spans([True] * 30, {5, 12, 20, 26}, min_len=8, max_len=50, trim=0) == [(12, 20)]


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.tuples(st.booleans(), st.integers(0, 9)), min_size=1, max_size=200),
    min_len=st.integers(1, 20),
    extra=st.integers(0, 30),
    trim=st.integers(0, 4),
)
def test_planner_spans_are_valid_and_avoid_every_boundary(frames, min_len, extra, trim):
    usable = [ok for ok, _ in frames]
    cuts = {i for i, (_, roll) in enumerate(frames) if roll == 0 and i > 0}
    spans = plan_clip_spans(usable, cuts, min_len=min_len, max_len=min_len + extra, trim=trim)
    last_end = 0
    for start, end in spans:
        assert last_end <= start < end <= len(usable)
        assert min_len <= end - start <= min_len + extra
        assert all(usable[start:end])
        assert not any(start < c < end for c in cuts)
        # `trim` frames of clearance: a cut lies between frames c-1 and c, an unusable frame u occupies u
        for c in cuts:
            assert end <= c - trim or start >= c + trim
        for u in (i for i, ok in enumerate(usable) if not ok):
            assert end <= u - trim or start >= u + 1 + trim
        last_end = end


def test_earliest_needed_never_passes_a_future_span_start():
    planner = ClipPlanner(min_len=3, max_len=6, trim=1)
    emitted, marks = [], []
    pattern = [True] * 8 + [False] * 2 + [True] * 15
    for i, ok in enumerate(pattern):
        marks.append(planner.earliest_needed)
        emitted += planner.push(ok, cut_before=(i == 20))
    emitted += planner.finish()
    for start, _ in emitted:
        assert all(mark <= start for mark in marks[: start + 1])


def test_histogram_distance_bounds():
    import numpy as np

    black = np.zeros((8, 8, 3), np.uint8)
    white = np.full((8, 8, 3), 255, np.uint8)
    assert histogram_distance(colour_histogram(black), colour_histogram(black)) == 0
    assert histogram_distance(colour_histogram(black), colour_histogram(white)) == pytest.approx(1.0)


def test_hard_cut_f1_and_no_clip_crosses_a_boundary(tmp_path):
    """Hard cuts found within ±1 frame at F1 >= 0.95 over varied videos (fps, sizes, fades, dissolves)."""
    detected_f1, crossings = [], []
    for seed in range(9):
        fps = (24, 25, 30, 29.97)[seed % 4]
        video = render_video(
            tmp_path / f"v{seed}.mp4",
            seconds=7,
            fps=fps,
            width=(320, 256, 400)[seed % 3],
            height=(240, 256, 224)[seed % 3],
            shots=5,
            transition=("cut", "fade", "dissolve")[seed % 3],
            seed=seed,
        )
        source = Source(str(video.path), f"{seed:064d}", 1, local_path=str(video.path))
        result = extract_clips(
            source, probe_video(str(video.path)), SceneParams(), ClipParams(width=32, height=32, fps=4), tmp_path
        )
        detected_f1.append(score_cuts(result.cuts, video.cuts, video.transitions, tolerance=1)[2])
        boundaries = [(c - 1, c) for c in video.cuts] + video.transitions
        crossings += [
            (seed, r.start_frame, r.end_frame)
            for r in result.rows
            if r.clip_id
            for a, b in boundaries
            if r.start_frame <= b and a < r.end_frame
        ]
    assert sum(detected_f1) / len(detected_f1) >= 0.95, detected_f1
    assert crossings == []


def test_adaptive_detector_finds_the_cuts_too(tmp_path):
    video = render_video(tmp_path / "a.mp4", seconds=6, fps=25, shots=4, seed=3)
    source = Source(str(video.path), "a" * 64, 1, local_path=str(video.path))
    result = extract_clips(
        source,
        probe_video(str(video.path)),
        SceneParams(detector="adaptive"),
        ClipParams(width=32, height=32, fps=4),
        tmp_path,
    )
    assert score_cuts(result.cuts, video.cuts, tolerance=1)[2] >= 0.95


def test_hd_sources_detect_cuts_from_plane_thumbnails(tmp_path):
    """720p frames take the point-sampled thumbnail path (yuv420p, >= 2x the detection width)."""
    from vidtune.tasks.extract import detection_thumbnail

    video = render_video(
        tmp_path / "hd.mp4", seconds=4, fps=25, width=1280, height=720, shots=4, transition="dissolve", seed=4
    )
    source = Source(str(video.path), "d" * 64, 1, local_path=str(video.path))
    result = extract_clips(
        source, probe_video(str(video.path)), SceneParams(), ClipParams(width=32, height=32, fps=4), tmp_path
    )
    assert score_cuts(result.cuts, video.cuts, video.transitions)[2] >= 0.95
    boundaries = [(c - 1, c) for c in video.cuts] + video.transitions
    assert not [r for r in result.rows if r.clip_id for a, b in boundaries if r.start_frame <= b and a < r.end_frame]
    import av

    with av.open(str(video.path)) as container:
        frame = next(container.decode(video=0))
    assert detection_thumbnail(frame, 256).shape == (144, 256, 3)
