"""Find input videos (a local folder, a file, or any fsspec URL) and identify each by sha256."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import tempfile
from pathlib import Path

import fsspec

from vidtune.tasks.files import sha256_of
from vidtune.tasks.images import IMAGE_EXTENSIONS
from vidtune.tasks.records import Source

VIDEO_EXTENSIONS = frozenset(
    [
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".m2ts",
        ".wmv",
        ".flv",
        ".3gp",
        ".ogv",
        ".gif",
    ]
)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def list_input_paths(input_path: str, images: bool = True) -> list[str]:
    """All video/GIF files (and with `images`, jpg/png/webp files) under `input_path` (recursive), sorted; a single
    file is returned as is."""
    extensions = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS if images else VIDEO_EXTENSIONS
    if is_remote(input_path):
        fs, root = fsspec.core.url_to_fs(input_path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if fs.isfile(root):
            return [input_path]
        found = fs.find(root)
        return sorted(f"{protocol}://{p}" for p in found if Path(p).suffix.lower() in extensions)
    root = Path(input_path.removeprefix("file://")).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"input: {input_path!r} does not exist")
    if root.is_file():
        return [str(root)]
    # Links are listed even when broken (a loop, a missing target), so they reach the manifest with a reason.
    return sorted(str(p) for p in root.rglob("*") if (p.is_symlink() or p.is_file()) and p.suffix.lower() in extensions)


def identify_source(path: str, download_dir: Path) -> Source:
    """Hash one input. Remote inputs are downloaded once into `download_dir` (named by sha) while hashing.

    Unreadable or empty files become a Source with `error` set, so they reach the manifest as failures.
    """
    try:
        if is_remote(path):
            return _fetch_remote(path, download_dir)
        size = os.path.getsize(path)
        if size == 0:
            return Source(path, None, 0, local_path=path, error="empty file (0 bytes)")
        with open(path, "rb") as f:
            return Source(path, sha256_of(f), size, local_path=path)
    except PermissionError:
        return Source(path, None, 0, error="permission denied: the file is not readable by this user")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Source(path, None, 0, error="symbolic link loop: the link points back at itself")
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return Source(path, None, 0, error=f"broken symbolic link: its target {os.readlink(path)!r} does not exist")
        if exc.errno in (errno.ENOENT, errno.EISDIR):
            return Source(path, None, 0, error=f"cannot open: {exc.strerror}")
        raise  # transient I/O (network filesystems, remote stores): the task retries these


def _fetch_remote(url: str, download_dir: Path) -> Source:
    digest = hashlib.sha256()
    size = 0
    suffix = Path(url).suffix.lower()
    download_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming.", suffix=".part", dir=download_dir)
    try:
        with os.fdopen(fd, "wb") as local, fsspec.open(url, "rb") as remote:
            while block := remote.read(1 << 20):
                digest.update(block)
                local.write(block)
                size += len(block)
        sha = digest.hexdigest()
        target = download_dir / f"{sha}{suffix}"
        os.replace(tmp, target)  # content-addressed: concurrent downloads of the same bytes agree
    finally:
        Path(tmp).unlink(missing_ok=True)
    if size == 0:
        return Source(url, None, 0, local_path=str(target), error="empty file (0 bytes)")
    return Source(url, sha, size, local_path=str(target))


def mark_duplicates(sources: list[Source]) -> list[Source]:
    """Same sha256 -> the first path (sorted order) is processed; the others point at it."""
    first_by_sha: dict[str, str] = {}
    marked = []
    for source in sources:
        if source.sha256 and source.error is None:
            if source.sha256 in first_by_sha:
                source = dataclasses.replace(source, duplicate_of=first_by_sha[source.sha256])
            else:
                first_by_sha[source.sha256] = source.path
        marked.append(source)
    return marked
