"""Discovery: local folders, fsspec URLs, duplicates, and unreadable files."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import fsspec
import pytest

from vidtune.tasks.discover import identify_source, list_input_paths, mark_duplicates


def test_lists_videos_and_images_recursively_and_ignores_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.MP4", "a/b/y.gif", "z.mov", "notes.txt", "a/thumb.JPG", "c.webp", "d.tiff"):
        (tmp_path / name).write_bytes(b"1")
    assert [p.removeprefix(str(tmp_path) + "/") for p in list_input_paths(str(tmp_path))] == [
        "a/b/y.gif",
        "a/thumb.JPG",
        "a/x.MP4",
        "c.webp",
        "z.mov",
    ]
    assert len(list_input_paths(str(tmp_path), images=False)) == 3


def test_missing_input_names_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match="input"):
        list_input_paths(str(tmp_path / "nope"))


def test_duplicates_point_at_the_first_copy(tmp_path, raw_videos):
    _, videos = raw_videos
    shutil.copy(videos[0].path, tmp_path / "a.mp4")
    shutil.copy(videos[0].path, tmp_path / "b.mp4")
    sources = mark_duplicates([identify_source(p, tmp_path) for p in list_input_paths(str(tmp_path))])
    assert sources[0].duplicate_of is None and sources[1].duplicate_of == sources[0].path
    assert sources[0].sha256 == sources[1].sha256


def test_remote_urls_are_downloaded_once_and_hashed(tmp_path, raw_videos):
    _, videos = raw_videos
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/clip one.mp4", videos[0].path.read_bytes())
    fs.pipe("/bucket/raw/readme.txt", b"x")
    paths = list_input_paths("memory://bucket/raw")
    assert paths == ["memory:///bucket/raw/clip one.mp4"]
    source = identify_source(paths[0], tmp_path / "dl")
    local = identify_source(str(videos[0].path), tmp_path)
    assert source.sha256 == local.sha256 and source.error is None
    assert open(source.local_path, "rb").read() == videos[0].path.read_bytes()


@contextmanager
def _as_nobody():
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_file_is_a_record_not_a_crash(tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(b"\x00" * 100)
    os.chmod(path, 0)
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:  # root ignores file modes: check as an unprivileged user
        with _as_nobody():
            source = identify_source(str(path), tmp_path)
    else:
        source = identify_source(str(path), tmp_path)
    assert source.sha256 is None and "permission denied" in source.error
