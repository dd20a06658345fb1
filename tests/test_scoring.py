"""Scores: motion from optical flow on known motion, CLIP with a tiny open_clip model loaded from a file,
frame sampling failures, and the one-model-per-worker cache."""

from __future__ import annotations

import av
import numpy as np
import pytest

from vidtune.tasks.annotate import Annotators, annotate_clips
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams, encode_clip
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.scoring import ClipScorer, ScoreParams, motion_score, sample_frames
from vidtune.training.tiny_models import TINY_CLIP


def _yuv(rgb: np.ndarray) -> np.ndarray:
    """An RGB image as the packed yuv420p planes clips are encoded from."""
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()


def _texture(h=96, w=160, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 8, w // 8 + 40, 3))
    return (np.kron(coarse, np.ones((8, 8, 1))) * 255).astype(np.uint8)


def test_motion_score_measures_a_known_pan():
    texture = _texture()
    for shift_px in (0, 2, 4):
        frames = np.stack([texture[:, i * shift_px : i * shift_px + 128] for i in range(5)])
        measured = motion_score(frames, dt=0.5, width=128)
        expected = shift_px / 128 * 100 / 0.5
        assert measured == pytest.approx(expected, abs=0.25 + 0.2 * expected)


def test_clip_scorer_loads_weights_from_a_file_and_returns_unit_embeddings(tiny_clip):
    scorer = ClipScorer(TINY_CLIP, str(tiny_clip), "cpu")
    rng = np.random.default_rng(0)
    frames = [
        rng.integers(0, 255, (4, 48, 48, 3), dtype=np.uint8),
        rng.integers(0, 255, (2, 48, 48, 3), dtype=np.uint8),
    ]
    scores, embeddings = scorer.score(frames, ["a red car", "a blue sky"])
    assert len(scores) == 2 and all(-1 <= s <= 1 for s in scores)
    assert embeddings.shape == (2, 32) and np.allclose(
        np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=1e-2
    )
    same = [np.repeat(frames[0][:1], 3, axis=0)]
    one = [frames[0][:1]]
    assert scorer.score(same, ["x"])[0][0] == pytest.approx(scorer.score(one, ["x"])[0][0], abs=1e-5)


def test_models_are_loaded_once_per_process(tiny_clip):
    scores = ScoreParams(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip))
    assert Annotators.load(CaptionParams(), scores).clip is Annotators.load(CaptionParams(), scores).clip


def test_the_weights_in_the_file_are_the_ones_scoring_even_when_the_file_is_replaced(tiny_clip, tmp_path):
    import shutil

    from vidtune.training.tiny_models import build_tiny_clip

    weights = shutil.copy(tiny_clip, tmp_path / "clip.safetensors")
    frames = [np.random.default_rng(0).integers(0, 255, (2, 48, 48, 3), dtype=np.uint8)]
    scores = ScoreParams(clip_model=TINY_CLIP, clip_pretrained=str(weights))
    first = Annotators.load(CaptionParams(), scores).clip.score(frames, ["a red car"])[0][0]
    assert ClipScorer(TINY_CLIP, str(tiny_clip), "cpu").score(frames, ["a red car"])[0][0] == pytest.approx(
        first, abs=1e-6
    )
    build_tiny_clip(weights, seed=1)  # other weights, same path (a warm worker has the old ones loaded)
    second = Annotators.load(CaptionParams(), scores).clip.score(frames, ["a red car"])[0][0]
    assert abs(second - first) > 1e-3
    assert ClipScorer(TINY_CLIP, str(weights), "cpu").score(frames, ["a red car"])[0][0] == pytest.approx(
        second, abs=1e-6
    )


def test_a_clip_whose_frames_cannot_be_read_fails_alone(tmp_path, tiny_clip):
    good = ClipRecord(clip_id="good", source="s", source_sha256="x", fps=8, end_s=2)
    bad = ClipRecord(clip_id="bad", source="s", source_sha256="x", fps=8, end_s=2)
    rng = np.random.default_rng(0)
    frames = [_yuv(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(16)]
    encode_clip(frames, tmp_path / "good.mp4", 8, ClipParams(width=32, height=32))
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    rows = annotate_clips(
        [good, bad],
        tmp_path,
        None,
        CaptionParams(trigger="t"),
        ScoreParams(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip)),
    )
    assert bad.status == Status.FAILED and "frames could not be sampled" in bad.reason
    assert good.status == Status.KEPT and good.clip_score is not None and good.motion_score is not None
    assert (tmp_path / "good.npy").exists() and rows == [good, bad]


def test_sample_frames_spreads_clip_frames_and_steps_motion_frames(tmp_path):
    frames = [_yuv(np.full((32, 32, 3), i * 10, np.uint8)) for i in range(20)]
    encode_clip(frames, tmp_path / "c.mp4", 8, ClipParams(width=32, height=32, crf=0))
    sampled = sample_frames(tmp_path / "c.mp4", fps=8, clip_frames=3, motion_fps=2)
    assert [int(round(f.mean() / 10)) for f in sampled.clip] == [0, 10, 19]
    assert len(sampled.motion) == 5 and sampled.motion_dt == 0.5
