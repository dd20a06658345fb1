"""Captions: sidecar files, templates, the default, and a tiny real VLM loaded like a user's model."""

from __future__ import annotations

import numpy as np
import pytest

from vidtune.tasks.captions import (
    CaptionParams,
    ClipFrames,
    VlmCaptioner,
    find_mapping_file,
    load_caption_mapping,
    render_caption,
    sidecar_caption,
    tile_frames,
)
from vidtune.tasks.records import ClipRecord
from vidtune.training.tiny_models import CAPTION_WORDS, build_tiny_captioner, build_tiny_video_captioner

ROW = ClipRecord(clip_id="c", source="/data/raw/my_trip-beach.mp4", source_sha256="x", start_s=1.0, end_s=3.5)


def test_default_template_uses_the_trigger_and_source_name():
    params = CaptionParams(trigger="in sks style")
    assert (
        render_caption(params.template_for(False), ROW, trigger=params.trigger, sidecar=None, vlm=None)
        == "in sks style, my trip beach"
    )


def test_default_without_trigger_is_still_not_empty():
    assert (
        render_caption(CaptionParams().template_for(False), ROW, trigger="", sidecar=None, vlm=None) == "my trip beach"
    )


def test_sidecar_text_wins_in_auto_mode():
    params = CaptionParams(trigger="sks")
    assert (
        render_caption(params.template_for(True), ROW, trigger="sks", sidecar="a dog runs", vlm=None)
        == "sks, a dog runs"
    )


def test_custom_template_fields_and_unknown_field():
    text = render_caption("{trigger} clip {start_s}-{end_s} ({duration_s} s)", ROW, trigger="t", sidecar=None, vlm=None)
    assert text == "t clip 1.00-3.50 (2.50 s)"
    with pytest.raises(ValueError, match="captions.template: unknown field 'colour'"):
        render_caption("{colour}", ROW, trigger="", sidecar=None, vlm=None)


def test_sidecar_txt_beside_the_video_and_mapping_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_text("  a red car at night \n")
    (tmp_path / "captions.csv").write_text('file,caption\nsub/b.mp4,"a dog, running"\nc.mp4,a cat\n')
    mapping = load_caption_mapping(find_mapping_file(str(tmp_path)))
    root = str(tmp_path)
    assert sidecar_caption(f"{root}/a.mp4", root, mapping) == "a red car at night"
    assert sidecar_caption(f"{root}/sub/b.mp4", root, mapping) == "a dog, running"
    assert sidecar_caption(f"{root}/other/c.mp4", root, mapping) == "a cat"  # by file name
    assert sidecar_caption(f"{root}/d.mp4", root, mapping) is None
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"file": "x.mp4", "caption": "waves"}\n')
    assert load_caption_mapping(str(jsonl)) == {"x.mp4": "waves"}


def test_vlm_mode_requires_a_model():
    with pytest.raises(ValueError, match="vlm_model is required"):
        CaptionParams(mode="vlm")


def test_tile_frames_lays_out_a_grid():
    frames = [np.full((4, 6, 3), i, np.uint8) for i in range(5)]
    grid = tile_frames(frames)
    assert grid.shape == (8, 18, 3) and grid[4, 0, 0] == 3 and grid[7, 17, 0] == 0


def random_clip(count: int, size: int, num_frames: int = 48, fps: float = 16.0, seed: int = 0) -> ClipFrames:
    rng = np.random.default_rng(seed)
    return ClipFrames([rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(count)], num_frames, fps)


def record_generate(captioner: VlmCaptioner) -> list[dict]:
    """What the captioner hands the model's `generate`, and how many tokens each call wrote."""
    calls: list[dict] = []
    generate = captioner.model.generate

    def recording(**inputs):
        out = generate(**inputs)
        prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        calls.append({**inputs, "new_tokens": out.shape[1] - prompt})
        return out

    captioner.model.generate = recording
    return calls


def test_tiny_blip_captions_a_grid_image_through_the_user_code_path(tmp_path):
    folder = build_tiny_captioner(tmp_path / "blip")
    captioner = VlmCaptioner(str(folder), "cpu")  # AutoProcessor / AutoModelForImageTextToText.from_pretrained
    calls = record_generate(captioner)
    clips = [random_clip(count, 32, seed=i) for i, count in enumerate((4, 4, 20))]  # 20: more than a grid shows
    captions = captioner.caption(clips, prompt=None, max_new_tokens=6, batch_size=2)
    assert len(captions) == 3
    for caption in captions:
        assert caption and set(caption.split()) <= set(CAPTION_WORDS)
    assert [tuple(c["pixel_values"].shape) for c in calls] == [(2, 3, 64, 64), (1, 3, 64, 64)]  # one image a clip
    assert not any("pixel_values_videos" in c for c in calls)


def test_tiny_qwen2_5_vl_captions_clips_as_videos_with_their_timing(tmp_path):
    folder = build_tiny_video_captioner(tmp_path / "qwen")
    captioner = VlmCaptioner(str(folder), "cpu")
    calls = record_generate(captioner)
    clips = [random_clip(4, 56), random_clip(3, 56, seed=1), random_clip(6, 56, num_frames=30, fps=24.0, seed=2)]
    captions = captioner.caption(clips, prompt=None, max_new_tokens=5, batch_size=2)

    assert len(captions) == 3 and all(captions)
    assert [c["new_tokens"] for c in calls] and all(c["new_tokens"] <= 5 for c in calls)
    assert not any("pixel_values" in c or "image_grid_thw" in c for c in calls)  # no grid image
    first, second = calls
    # 56x56 frames are 4x4 patches of 14; two frames a temporal patch, the 3-frame clip padded to 4
    assert first["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    assert second["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert tuple(first["pixel_values_videos"].shape) == (2 * 2 * 16, 3 * 2 * 14 * 14)
    # every 2x2 patches become one <|video_pad|> in the prompt
    assert (first["input_ids"] == captioner.processor.video_token_id).sum(1).tolist() == [8, 8]
    # seconds per temporal patch = 2 frames / the sampled rate (frames over the clip's 48 / 16 = 3 s, 30 / 24 s)
    assert first["second_per_grid_ts"].tolist() == pytest.approx([2 / (4 / 3.0), 2 / (3 / 3.0)])
    assert second["second_per_grid_ts"].tolist() == pytest.approx([2 / (6 / 1.25)])

    # A still (a curated image: one frame) goes in as the image it is, not as a video of copies.
    calls.clear()
    (still,) = captioner.caption([random_clip(1, 56, num_frames=1, seed=3)], None, max_new_tokens=5, batch_size=2)
    assert still and calls[0]["image_grid_thw"].tolist() == [[1, 4, 4]] and "pixel_values_videos" not in calls[0]


def test_long_captions_are_allowed_and_kept_whole():
    params = CaptionParams(mode="vlm", vlm_model="m", vlm_max_new_tokens=1024, vlm_frames=32)
    assert params.vlm_max_new_tokens == 1024
    with pytest.raises(ValueError, match="vlm_max_new_tokens"):
        CaptionParams(mode="vlm", vlm_model="m", vlm_max_new_tokens=1025)
    long = " ".join(["a red car drives down a wide city street at night"] * 60)  # about 660 words
    assert render_caption(params.template_for(False), ROW, trigger="", sidecar=None, vlm=long) == long


def test_an_unreadable_sidecar_is_ignored_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    assert sidecar_caption(str(tmp_path / "a.mp4"), str(tmp_path), {}) is None
