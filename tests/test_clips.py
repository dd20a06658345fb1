"""Frame conversion and resampling for clip extraction."""

from __future__ import annotations

import av
import numpy as np
import pytest

from vidtune.tasks.bars import Crop
from vidtune.tasks.clips import (
    ClipParams,
    FrameResampler,
    choose_size,
    cover_crop_size,
    to_training_frame,
    to_working_frame,
    yuv_to_rgb,
)
from vidtune.tasks.probe import probe_video
from vidtune.tasks.synthetic_videos import render_video


@pytest.mark.parametrize(
    "display, target, cover",
    [((1278, 718), (832, 480), (855, 480)), ((640, 480), (256, 256), (342, 256)), ((100, 400), (64, 64), (64, 256))],
)
def test_cover_crop_size_covers_the_target_and_keeps_aspect(display, target, cover):
    assert cover_crop_size(*display, *target) == cover
    w, h = cover
    assert w >= target[0] and h >= target[1]
    assert w / h == pytest.approx(display[0] / display[1], rel=0.01)


def _frame_with_red_top_left(width=64, height=32) -> av.VideoFrame:
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    return av.VideoFrame.from_ndarray(image, format="rgb24")


@pytest.mark.parametrize(
    "rotation, red_corner",
    # counter-clockwise display rotation moves the top-left corner to the bottom-left (90), bottom-right (180)...
    [(0, (0, 0)), (90, (1, 0)), (180, (1, 1)), (270, (0, 1))],
)
def test_training_frames_are_upright(rotation, red_corner):
    frame = _frame_with_red_top_left()
    width, height = (32, 64) if rotation % 180 else (64, 32)  # display size
    working, tags = to_working_frame(frame, rotation, width, height)
    assert working.size == (width, height)
    packed = to_training_frame(working, Crop.full(width, height), 32, 32)
    assert packed.shape == (48, 32)  # yuv420p planes
    image = yuv_to_rgb(packed, tags)
    row, col = red_corner
    patch = image[row * 24 : row * 24 + 8, col * 24 : col * 24 + 8]
    assert patch[..., 0].mean() > 200 and patch[..., 2].mean() < 50


def test_rotated_source_probes_as_upright_portrait(tmp_path):
    video = render_video(tmp_path / "r.mp4", seconds=1, fps=25, width=320, height=240, shots=1, rotation=90)
    probe = probe_video(str(video.path))
    assert probe.rotation == 90
    assert probe.display_size == (240, 320)


def test_resampler_counts_grid_points_from_30_to_8_fps():
    resampler = FrameResampler(fps=8)
    times = [i / 30 for i in range(31)]
    counts = [resampler.grid_points(a, b) for a, b in zip(times, times[1:])]
    assert sum(counts) == 8  # one second of 30 fps at 8 fps
    assert set(counts) <= {0, 1}


def test_resampler_repeats_frames_when_upsampling():
    resampler = FrameResampler(fps=24)
    times = [i / 10 for i in range(11)]
    counts = [resampler.grid_points(a, b) for a, b in zip(times, times[1:])]
    assert sum(counts) == 24 and max(counts) == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("width", 100),
        ("height", 30),
        ("fps", 0),
        ("crf", 60),
        ("buckets", ["832x480", "830x480"]),
        ("buckets", ["wide"]),
    ]
    + [("buckets", []), ("max_upscale", 0.9)],
)
def test_clip_params_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ClipParams(**{field: value})


def test_default_sizes_are_landscape_portrait_and_square_of_about_the_same_area():
    assert ClipParams().sizes() == [(832, 480), (480, 832), (624, 624)]
    assert ClipParams(width=64, height=64).sizes() == [(64, 64)]
    assert ClipParams(buckets=["512x512", "512x512", "256x144"]).sizes() == [(512, 512), (256, 144)]


@pytest.mark.parametrize(
    "picture, size",
    [
        ((1920, 1080), (832, 480)),  # 16:9 -> landscape
        ((1080, 1920), (480, 832)),  # phone portrait stays portrait
        ((1000, 1000), (624, 624)),
        ((640, 480), (832, 480)),  # 4:3: closer to landscape than square; 1.3x up is allowed
        ((480, 640), (480, 832)),  # needs 1.3x: within max_upscale 1.5
        ((440, 440), (624, 624)),  # 1.42x
        ((400, 400), None),  # 1.56x to the square, more to the others
        ((160, 90), None),  # the music video: 5.2x
    ],
)
def test_each_picture_goes_to_the_closest_aspect_that_needs_no_blowing_up(picture, size):
    assert choose_size(*picture, ClipParams().sizes(), 1.5) == size


def test_a_picture_too_small_for_the_closest_aspect_takes_a_smaller_bucket():
    sizes = ClipParams(buckets=["832x480", "480x832", "624x624", "416x240"]).sizes()
    assert choose_size(400, 226, sizes, 1.5) == (416, 240)
    assert choose_size(1280, 720, sizes, 1.5) == (832, 480)  # the larger of two with the same aspect
    assert choose_size(100, 56, sizes, 1.5) is None


def test_clip_frames_match_the_source_frame_they_come_from(raw_videos, tmp_path):
    """Geometry (rotation, cover, crop) and colour survive the YUV path: compare with PIL's own resize/crop."""
    from PIL import Image

    from vidtune.tasks.discover import identify_source
    from vidtune.tasks.extract import extract_clips
    from vidtune.tasks.scenes import SceneParams

    _, videos = raw_videos
    for video in (v for v in videos if v.rotation or v.path.suffix == ".gif" or v.width == 1278):
        source = identify_source(str(video.path), tmp_path)
        probe = probe_video(str(video.path))
        row = extract_clips(
            source, probe, SceneParams(), ClipParams(width=128, height=96, fps=8, crf=10), tmp_path
        ).rows[0]
        width, height = (96, 128) if probe.display_size[1] > probe.display_size[0] else (128, 96)  # portrait stays
        assert (row.width, row.height) == (width, height), video.path.name
        with av.open(str(tmp_path / f"{row.clip_id}.mp4")) as clip:
            first = next(clip.decode(video=0)).to_ndarray(format="rgb24").astype(float)
        with av.open(str(video.path)) as container:
            frame = next(f for i, f in enumerate(container.decode(video=0)) if i == row.start_frame)
        reference = Image.fromarray(frame.to_ndarray(format="rgb24")).rotate(probe.rotation, expand=True)
        w, h = reference.size
        scale = max(width / w, height / h)
        reference = reference.resize((round(w * scale), round(h * scale)), Image.BOX)
        left, top = (reference.size[0] - width) // 2, (reference.size[1] - height) // 2
        expected = np.asarray(reference.crop((left, top, left + width, top + height))).astype(float)
        assert np.abs(first - expected).mean() < 8, video.path.name
        assert np.abs(first - expected[::-1, ::-1]).mean() > 20  # the comparison can tell orientation apart


def test_resampler_skips_grid_points_inside_a_gap():
    resampler = FrameResampler(fps=10)
    assert resampler.grid_points(0.0, 0.1) == 1
    assert resampler.grid_points(3600.0, 3600.1) == 1  # an hour-long hole is not filled with copies


def test_frames_taken_while_writing_are_the_ones_read_back_from_the_clip(raw_videos, tmp_path):
    """The scores read each clip's frames as they are written instead of decoding the MP4 again: the same
    frames (indices and content, up to the encoder's loss), so the scores do not change."""
    from vidtune.tasks.discover import identify_source
    from vidtune.tasks.extract import extract_clips
    from vidtune.tasks.scenes import SceneParams
    from vidtune.tasks.scoring import sample_frames, sample_images

    _, videos = raw_videos
    video = next(v for v in videos if v.rotation)
    params = ClipParams(width=128, height=96, fps=8)

    def sample(images, fps, color):
        return sample_images(images, fps, 4, 2.0, lambda packed: yuv_to_rgb(packed, color))

    result = extract_clips(
        identify_source(str(video.path), tmp_path),
        probe_video(str(video.path)),
        SceneParams(),
        params,
        tmp_path,
        sample,
    )
    assert set(result.sampled) == {r.clip_id for r in result.rows if r.clip_id}
    for row in (r for r in result.rows if r.clip_id):
        taken, read = result.sampled[row.clip_id], sample_frames(tmp_path / f"{row.clip_id}.mp4", row.fps, 4, 2.0)
        assert taken.clip.shape == read.clip.shape and taken.motion.shape == read.motion.shape
        assert taken.motion_dt == read.motion_dt
        assert np.abs(taken.clip.astype(float) - read.clip).mean() < 3  # crf 18: near-lossless
