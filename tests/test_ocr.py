"""The text-area score: PP-OCR's detector on rendered subtitles and a corner logo, against the same frames without
text, and the filter it feeds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vidtune.tasks.annotate import annotate_clips
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.ocr import TextAreaScorer, text_area
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.scoring import SampledFrames, ScoreParams

H, W = 256, 448
SUBTITLE = ("where are you going tonight?", (60, 236), 0.7)
LOGO = ("NEWS 24", (360, 24), 0.5)


def _background(seed: int) -> np.ndarray:
    """Blurry colour blobs with grain: no edges that look like strokes."""
    rng = np.random.default_rng(seed)
    image = sum(
        cv2.resize(rng.random((H // s + 2, W // s + 2, 3)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
        * s
        for s in (4, 16, 64)
    )
    return ((image - image.min()) / np.ptp(image) * 200 + 20).astype(np.uint8)


def _glyphs(text, org, scale) -> np.ndarray:
    return cv2.putText(np.zeros((H, W), np.uint8), text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 2, cv2.LINE_AA)


def _overlay(image: np.ndarray, *texts) -> np.ndarray:
    """White text with a black outline, as subtitles and channel logos are drawn."""
    out = image.copy()
    for text in texts:
        glyphs = _glyphs(*text)
        out[cv2.dilate(glyphs, np.ones((5, 5), np.uint8)) > 0] = 0
        out[glyphs > 127] = 255
    return out


def _box_percent(text) -> float:
    _, _, w, h = cv2.boundingRect(_glyphs(*text))
    return 100 * w * h / (W * H)


@pytest.fixture(scope="module")
def scorer() -> TextAreaScorer:
    return TextAreaScorer()


def test_text_area_is_the_union_of_the_boxes_clipped_to_the_frame():
    square = np.array([[0, 0], [9, 0], [9, 9], [0, 9]], np.float32)  # 10 x 10 pixels, corners included
    boxes = [square, square + 5, square + [95, 0]]  # the second overlaps the first; the third is half outside
    assert text_area(boxes, 100, 100) == pytest.approx((100 + 75 + 50) / 10_000)
    assert text_area([], 100, 100) == 0


def test_subtitles_and_a_logo_cover_about_their_box_and_plain_frames_nothing(scorer):
    plain = _background(0)
    assert scorer.score(plain[None]) < 0.1
    for text in (SUBTITLE, LOGO):
        measured = scorer.score(_overlay(plain, text)[None])
        assert _box_percent(text) < measured < 2.5 * _box_percent(text)  # boxes are padded around the strokes
    clip = np.stack([_background(0), _overlay(_background(1), SUBTITLE), _overlay(_background(2), LOGO)])
    assert scorer.score(clip) == pytest.approx(scorer.score(clip[1:2]))  # the most text in any frame


def test_clips_with_text_overlays_are_filtered_with_the_area_in_the_reason(tmp_path):
    frames = {
        "plain": np.stack([_background(3), _background(4)]),
        "subtitled": np.stack([_background(3), _overlay(_background(4), SUBTITLE, LOGO)]),
    }
    rows = [ClipRecord(clip_id=name, source="s.mp4", source_sha256="x", fps=8, end_s=1) for name in frames]
    sampled = {name: SampledFrames(clip=f, motion=f, motion_dt=0.5) for name, f in frames.items()}
    scores = ScoreParams(clip=False, motion=False, text_area=True, clip_frames=2, device="cpu")
    annotate_clips(rows, tmp_path, None, CaptionParams(trigger="t"), scores, sampled)
    plain, subtitled = apply_filters(rows, FilterParams(max_text_area=5))
    assert plain.status == Status.KEPT and plain.text_area < 0.1
    assert subtitled.status == Status.FILTERED and subtitled.text_area > 5
    assert (
        subtitled.reason
        == f"text overlay: {subtitled.text_area:.1f} % of the frame is text > filters.max_text_area 5 %"
    )
    assert apply_filters(rows, FilterParams())[1].status == Status.KEPT  # no threshold, no filter
