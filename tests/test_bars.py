"""Real footage's framing: bars cropped per shot, dark scenes left whole, pictures never blown up, every aspect ratio
kept. Sources are generated H.264 files with bars of known size; the clips are decoded back and looked at."""

from __future__ import annotations

import av
import numpy as np
import pytest

from vidtune.tasks.bars import Crop, detect_active_area
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.extract import extract_clips
from vidtune.tasks.probe import probe_video
from vidtune.tasks.records import Source, Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.source import SourceSettings, curate_source
from vidtune.tasks.synthetic_videos import render_video

SMALL = ClipParams(buckets=["128x80", "80x128", "96x96"], fps=8)  # small sizes keep encoding cheap


def _extract(video, params=SMALL, tmp_path=None):
    source = Source(str(video.path), video.path.stem.ljust(64, "0"), 1, local_path=str(video.path))
    return extract_clips(source, probe_video(str(video.path)), SceneParams(), params, tmp_path)


def _first_frame_luma(path) -> np.ndarray:
    with av.open(str(path)) as clip:
        return next(clip.decode(video=0)).to_ndarray(format="gray").astype(float)


def _border_levels(luma: np.ndarray) -> list[float]:
    """Mean luma of the outermost 2 rows/columns on each side (left, top, right, bottom)."""
    return [luma[:, :2].mean(), luma[:2].mean(), luma[:, -2:].mean(), luma[-2:].mean()]


@pytest.mark.parametrize(
    "size, bars",
    [
        ((320, 240), (0, 30, 0, 30)),  # letterbox
        ((320, 180), (40, 0, 40, 0)),  # pillarbox
        ((320, 240), (24, 20, 24, 20)),  # windowbox
        ((320, 180), (0, 0, 0, 0)),  # none
    ],
    ids=["letterbox", "pillarbox", "windowbox", "none"],
)
def test_bars_are_cropped_and_recorded(tmp_path, size, bars):
    width, height = size
    video = render_video(tmp_path / "v.mp4", seconds=3, fps=25, width=width, height=height, shots=2, bars=bars, seed=1)
    rows = [r for r in _extract(video, tmp_path=tmp_path).rows if r.clip_id]
    assert rows and all(r.status == Status.KEPT for r in rows)
    left, top, right, bottom = bars
    for row in rows:
        # Recorded in source pixels, rounded inwards to even lines: at most 2 px of picture lost per side.
        assert 0 <= row.crop_left - left <= 2 and 0 <= row.crop_top - top <= 2
        assert 0 <= (width - left - right) - row.active_width <= 4
        assert 0 <= (height - top - bottom) - row.active_height <= 4
        assert min(_border_levels(_first_frame_luma(tmp_path / f"{row.clip_id}.mp4"))) > 40  # picture, no bar


def test_uncropped_clips_show_the_bars_the_crop_removes(tmp_path):
    """The check above can fail: with crop_bars off, the same clip's border is black."""
    video = render_video(tmp_path / "v.mp4", seconds=2, fps=25, width=320, height=180, shots=1, bars=(40, 0, 40, 0))
    params = SMALL.model_copy(update={"crop_bars": False})
    row = next(r for r in _extract(video, params, tmp_path).rows if r.clip_id)
    assert (row.crop_left, row.active_width) == (0, 320)
    left, _, right, _ = _border_levels(_first_frame_luma(tmp_path / f"{row.clip_id}.mp4"))
    assert max(left, right) < 24


def test_bars_that_appear_mid_video_are_cropped_from_that_shot_on(tmp_path):
    shape = dict(seconds=6, fps=25, width=320, height=180, shots=3, seed=2)
    matte_from = render_video(tmp_path / "plain.mp4", **shape).cuts[1]
    video = render_video(tmp_path / "m.mp4", **shape, bars=(0, 30, 0, 30), bars_from=matte_from)
    rows = [r for r in _extract(video, tmp_path=tmp_path).rows if r.clip_id]
    before = [r.crop_top for r in rows if r.end_frame <= matte_from]
    after = [r.crop_top for r in rows if r.start_frame >= matte_from]
    assert before and after
    assert set(before) == {0} and all(30 <= top <= 32 for top in after)


@pytest.mark.parametrize(
    "look", [dict(brightness=0.3, vignette=True), dict(brightness=0.15), dict(vignette=True)], ids=str
)
def test_dark_scenes_are_not_mistaken_for_bars(tmp_path, look):
    """A night scene falling off to black at the borders has dark borders, but no edge where a bar ends."""
    video = render_video(tmp_path / "d.mp4", seconds=3, fps=25, width=320, height=240, shots=2, seed=3, **look)
    rows = [r for r in _extract(video, tmp_path=tmp_path).rows if r.clip_id]
    assert rows and {(r.crop_left, r.crop_top, r.active_width, r.active_height) for r in rows} == {(0, 0, 320, 240)}


def test_bars_around_a_dark_picture_or_a_fade_are_still_found(tmp_path):
    dark = render_video(
        tmp_path / "dark.mp4", seconds=3, fps=25, width=320, height=240, shots=1, bars=(0, 30, 0, 30), brightness=0.3
    )
    fade = render_video(
        tmp_path / "fade.mp4", seconds=4, fps=25, width=320, height=240, shots=2, bars=(0, 30, 0, 30), transition="fade"
    )
    for video in (dark, fade):
        rows = [r for r in _extract(video, tmp_path=tmp_path).rows if r.clip_id]
        assert rows and all(30 <= r.crop_top <= 32 for r in rows), video.path.name


def test_a_shot_with_no_light_at_all_is_not_cropped():
    black = [np.full((90, 160), 16, np.uint8)] * 4
    assert detect_active_area(black, black=16, threshold=10) == Crop.full(160, 90)


def test_portrait_footage_stays_portrait_and_whole(tmp_path):
    video = render_video(tmp_path / "phone.mp4", seconds=2, fps=30, width=360, height=640, shots=1, seed=4)
    row = next(r for r in _extract(video, tmp_path=tmp_path).rows if r.clip_id)
    assert (row.width, row.height) == (80, 128)
    with av.open(str(tmp_path / f"{row.clip_id}.mp4")) as clip:
        assert (clip.streams.video[0].width, clip.streams.video[0].height) == (80, 128)


def test_the_issues_music_video_is_filtered_not_blown_up(tmp_path):
    """160 x 90, pillarboxed, curated with the default sizes (832 x 480 and friends): 5x upscaling is refused."""
    video = render_video(tmp_path / "mv.mp4", seconds=2, fps=25, width=160, height=90, shots=1, bars=(20, 0, 20, 0))
    source = Source(str(video.path), "b" * 64, 1, local_path=str(video.path))
    settings = SourceSettings(SceneParams(), ClipParams(), *_no_annotation())
    (row,) = curate_source(source, settings, tmp_path).rows
    assert row.status == Status.FILTERED and row.clip_id is None  # one row for the source, nothing decoded
    assert row.reason.startswith("resolution too low: the picture is 160x90")
    assert "clips.max_upscale 1.5" in row.reason and "clips.buckets" in row.reason


def test_a_shot_whose_picture_is_too_small_once_cropped_goes_to_a_smaller_bucket_or_is_filtered(tmp_path):
    """640 x 360 with 160 px pillars: a 320 x 360 picture. The source could fill 832 x 480; the shot cannot."""
    video = render_video(tmp_path / "p.mp4", seconds=2, fps=25, width=640, height=360, shots=1, bars=(160, 0, 160, 0))
    rows = [r for r in _extract(video, ClipParams(fps=8), tmp_path).rows if r.clip_id]
    assert rows and all(r.status == Status.FILTERED for r in rows)
    assert all(r.reason.startswith("resolution too low: the picture is 320x360") for r in rows)
    assert not any((tmp_path / f"{r.clip_id}.mp4").exists() for r in rows)  # nothing encoded for them

    smaller = ClipParams(buckets=["832x480", "480x832", "624x624", "320x320"], fps=8)
    rows = [r for r in _extract(video, smaller, tmp_path).rows if r.clip_id]
    assert rows and all(r.status == Status.KEPT and (r.width, r.height) == (320, 320) for r in rows)


def _no_annotation():
    from vidtune.tasks.captions import CaptionParams
    from vidtune.tasks.scoring import ScoreParams

    return CaptionParams(), ScoreParams(clip=False, motion=False)
