"""Images beside videos: jpg/png/webp files are discovered, framed like shots (upright, bars cropped, an aspect
bucket, never blown up) and stored as single-frame clips; the manifest says which rows are images. The images are
generated here in the forms real folders hold them (phone JPEGs with an EXIF rotation, transparent and 16-bit PNGs,
letterboxed stills, thumbnails, a truncated download)."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.discover import identify_source, list_input_paths
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.records import Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.source import SourceSettings, curate_source
from vidtune.tasks.synthetic_videos import render_video

SETTINGS = SourceSettings(
    SceneParams(),
    ClipParams(buckets=["64x48", "48x64", "64x64"], fps=8),
    CaptionParams(trigger="sks"),
    ScoreParams(clip=False, motion=True),
)
RED, BLUE = (220, 40, 40), (40, 60, 220)


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    """A textured picture (not flat: bar detection and encoding see what a photo gives them)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(60, 200, (height, width, 3))).astype(np.uint8)


def _halves(height: int, width: int) -> np.ndarray:
    """Upright: red top half, blue bottom half."""
    picture = np.empty((height, width, 3), np.uint8)
    picture[: height // 2], picture[height // 2 :] = RED, BLUE
    return picture


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stills")
    # A phone photo: stored sideways (landscape pixels) with EXIF orientation 6 ("rotate 90 CW to display").
    upright = _halves(160, 120)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, k=1).copy()).save(folder / "phone.jpg", quality=95, exif=exif)
    # A cut-out with transparent surroundings.
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[24:72, 32:96] = (*RED, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    # A 16-bit greyscale scan at mid grey.
    Image.fromarray(np.full((96, 128), 32768, np.uint16)).save(folder / "scan16.png")
    # A letterboxed film still (webp): 24 px bars above and below a 320x192 picture.
    still = np.zeros((240, 320, 3), np.uint8)
    still[24:216] = _noise(192, 320, seed=3)
    Image.fromarray(still).save(folder / "still.webp", quality=95)
    Image.fromarray(_noise(24, 32, seed=4)).save(folder / "thumb.jpg")  # far below every size
    (folder / "broken.jpg").write_bytes((folder / "phone.jpg").read_bytes()[:200])  # a cut-off download
    render_video(folder / "clip.mp4", seconds=3, fps=24, width=128, height=96, shots=1, seed=2)
    return folder


@pytest.fixture(scope="module")
def curated(images, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging")
    rows = {}
    for path in list_input_paths(str(images)):
        source = identify_source(path, staging / "downloads")
        (row,) = [r for r in curate_source(source, SETTINGS, staging).rows if r.clip_id or r.status != Status.KEPT][:1]
        rows[path.rsplit("/", 1)[-1]] = (row, staging / source.sha256 / f"{row.clip_id}.mp4" if row.clip_id else None)
    return rows


def _only_frame(path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as clip:
        frames = [f.to_ndarray(format="rgb24").astype(float) for f in clip.decode(video=0)]
    return frames[0], len(frames)


def test_images_are_discovered_beside_videos_unless_switched_off(images):
    names = [p.rsplit("/", 1)[-1] for p in list_input_paths(str(images))]
    assert names == ["broken.jpg", "clip.mp4", "cutout.png", "phone.jpg", "scan16.png", "still.webp", "thumb.jpg"]
    assert [p.rsplit("/", 1)[-1] for p in list_input_paths(str(images), images=False)] == ["clip.mp4"]


def test_an_image_is_one_frame_clip_marked_as_image(curated):
    row, clip = curated["cutout.png"]
    assert (row.media, row.num_frames, row.status, row.caption) == ("image", 1, Status.KEPT, "sks, cutout")
    assert row.motion_score is None  # a still is not "static": the motion filter leaves it alone
    assert apply_filters([row], FilterParams(min_motion=0.5))[0].status == Status.KEPT
    frame, count = _only_frame(clip)
    assert count == 1 and frame.shape == (48, 64, 3)
    assert curated["clip.mp4"][0].media == "video"


def test_exif_rotation_is_applied_and_portrait_stays_portrait(curated):
    row, clip = curated["phone.jpg"]
    assert (row.width, row.height) == (48, 64)
    frame, _ = _only_frame(clip)
    top, bottom = frame[4:20].mean(axis=(0, 1)), frame[-20:-4].mean(axis=(0, 1))
    assert np.abs(top - RED).max() < 20 and np.abs(bottom - BLUE).max() < 20  # upright: red above blue


def test_transparency_lies_on_white_and_is_not_cropped_as_bars(curated):
    row, clip = curated["cutout.png"]
    assert (row.crop_left, row.crop_top, row.active_width, row.active_height) == (0, 0, 128, 96)
    frame, _ = _only_frame(clip)
    assert frame[:4].mean() > 235 and np.abs(frame[20:28, 28:36].mean(axis=(0, 1)) - RED).max() < 20


def test_sixteen_bit_grey_keeps_its_level(curated):
    frame, _ = _only_frame(curated["scan16.png"][1])
    assert abs(frame.mean() - 128) < 6


def test_letterboxed_still_is_cropped_to_its_picture(curated):
    row, clip = curated["still.webp"]
    # Bars are found on the working frame (here about half the source size): within 2 of its pixels.
    assert row.crop_top == pytest.approx(24, abs=4) and row.active_height == pytest.approx(192, abs=8)
    assert (row.width, row.height) == (64, 48)
    frame, _ = _only_frame(clip)
    assert min(frame[:2].mean(), frame[-2:].mean()) > 40  # picture to the edges, no black band


def test_small_and_broken_images_are_rows_with_reasons(curated):
    thumb, clip = curated["thumb.jpg"]
    assert thumb.status == Status.FILTERED and thumb.reason.startswith("resolution too low: the picture is 32x24")
    assert not clip.exists()
    broken, _ = curated["broken.jpg"]
    assert (broken.status, broken.media, broken.clip_id) == (Status.FAILED, "image", None)
    assert broken.reason.startswith("image decoding failed")
