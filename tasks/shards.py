"""Pack staged clips into size-bounded WebDataset shards, atomically and append-only.

The shards themselves are the record of what is packed: a rerun lists their members and packs only clips not
yet in any shard, so a crash between two shards never duplicates a clip. Each shard is written under a hidden
temporary name and renamed when complete, so `shards/*.tar` only ever matches whole shards.
"""

from __future__ import annotations

import errno
import json
import re
import tarfile
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field

from vidtune.tasks.files import atomic_path
from vidtune.tasks.records import ClipRecord, Status

SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.tar$")


class ShardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_shard_mb: float = Field(256.0, gt=0, description="A shard is closed once it reaches this size.")
    max_clips_per_shard: int = Field(1000, ge=1, description="A shard is closed once it holds this many clips.")


def packed_clips(shard_dir: Path) -> dict[str, str]:
    """clip_id -> shard file name, read from the complete shards on disk."""
    packed: dict[str, str] = {}
    for shard in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                packed.setdefault(name.split(".", 1)[0], shard.name)
    return packed


def _next_shard_index(shard_dir: Path) -> int:
    indices = [int(m.group(1)) for p in shard_dir.glob("shard-*.tar") if (m := SHARD_PATTERN.match(p.name))]
    return max(indices, default=-1) + 1


def _sample(row: ClipRecord, clip_file: Path, shard_name: str) -> dict:
    meta = {**row.to_dict(), "shard": shard_name}
    sample = {"__key__": row.clip_id, "mp4": clip_file.read_bytes(), "txt": row.caption, "json": json.dumps(meta)}
    embedding = clip_file.with_suffix(".npy")  # CLIP image embedding, when scores.clip is on
    if embedding.exists():
        sample["npy"] = embedding.read_bytes()
    return sample


def pack_shards(rows: Iterable[ClipRecord], clip_file_of, shard_dir: Path, params: ShardParams) -> dict[str, str]:
    """Pack every kept clip that is not in a shard yet. `clip_file_of(row)` gives its staged MP4 (its CLIP
    embedding, if any, is the .npy beside it). Shards are rebuilt if they hold a clip that is no longer kept.

    Returns clip_id -> shard name for all kept clips (already packed and new).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    for stale in shard_dir.glob(".shard-*.tmp"):  # left by a run killed while writing a shard
        stale.unlink()
    packed = packed_clips(shard_dir)
    outdated: list[Path] = []
    if set(packed) - {r.clip_id for r in rows if r.status == Status.KEPT}:
        # Filters changed since the shards were written: write a new set, then retire the old one.
        outdated, packed = sorted(shard_dir.glob("shard-*.tar")), {}
    todo = deque(
        sorted((r for r in rows if r.status == Status.KEPT and r.clip_id not in packed), key=lambda r: r.clip_id)
    )
    index = _next_shard_index(shard_dir)
    max_bytes = params.max_shard_mb * 2**20
    try:
        _write_shards(todo, clip_file_of, shard_dir, index, max_bytes, params.max_clips_per_shard, packed)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        missing = len({r.clip_id for r in rows if r.status == Status.KEPT} - set(packed_clips(shard_dir)))
        raise OSError(
            errno.ENOSPC,
            f"no space left on the device of {shard_dir} with {missing} kept clips still to pack "
            "(every shard written so far is complete, the one being written was removed); free some space, "
            "or choose an OUTPUT on a larger disk, and run the same command again: it packs only what is missing",
        ) from exc
    for shard in outdated:
        shard.unlink()
    return packed


def _write_shards(
    todo: deque, clip_file_of, shard_dir: Path, index: int, max_bytes: float, max_clips: int, packed: dict
) -> None:
    """Write `todo` into shards from `index` on, each renamed into place when complete; updates `packed`."""
    while todo:
        name = f"shard-{index:06d}.tar"
        with atomic_path(shard_dir / name) as tmp:
            with wds.TarWriter(str(tmp), mtime=0) as writer:  # mtime=0: same clips, same bytes
                size, count = 0, 0
                # A shard stays under max_shard_mb unless one clip alone is larger.
                while todo and count < max_clips:
                    sample = _sample(todo[0], clip_file_of(todo[0]), name)
                    if count and size + _payload_bytes(sample) > max_bytes:
                        break
                    size += writer.write(sample)
                    count += 1
                    packed[todo.popleft().clip_id] = name
        index += 1


def _payload_bytes(sample: dict) -> int:
    return sum(len(v) if isinstance(v, bytes) else len(v.encode()) for k, v in sample.items() if k != "__key__")
