"""Captions: sidecar files, templates, the default, and a tiny real VLM loaded like a user's model."""

from __future__ import annotations

import numpy as np
import pytest

from vidtune.tasks.captions import (
    CaptionParams,
    VlmCaptioner,
    find_mapping_file,
    load_caption_mapping,
    render_caption,
    sidecar_caption,
    tile_frames,
)
from vidtune.tasks.records import ClipRecord
from vidtune.training.tiny_models import CAPTION_WORDS, build_tiny_captioner

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


def test_tiny_blip_captions_through_the_user_code_path(tmp_path):
    folder = build_tiny_captioner(tmp_path / "blip")
    captioner = VlmCaptioner(str(folder), "cpu")  # AutoProcessor / AutoModelForImageTextToText.from_pretrained
    rng = np.random.default_rng(0)
    clips = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    captions = captioner.caption(clips, prompt=None, max_new_tokens=6, batch_size=2)
    assert len(captions) == 3
    for caption in captions:
        assert caption and set(caption.split()) <= set(CAPTION_WORDS)


def test_an_unreadable_sidecar_is_ignored_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    assert sidecar_caption(str(tmp_path / "a.mp4"), str(tmp_path), {}) is None
