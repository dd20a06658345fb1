"""Shard packing: size-bounded, append-only, and a crash never leaves a partial shard or a duplicate clip."""

from __future__ import annotations

import pytest
import webdataset as wds

from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.shards import ShardParams, pack_shards, packed_clips


def _rows(tmp_path, n, size=50_000):
    rows = []
    for i in range(n):
        clip_id = f"00000000-0000-0000-0000-{i:012d}"
        (tmp_path / f"{clip_id}.mp4").write_bytes(bytes([i % 256]) * size)
        rows.append(ClipRecord(clip_id=clip_id, source="s.mp4", source_sha256="x", caption=f"clip {i}"))
    rows.append(ClipRecord(clip_id=None, source="bad.mp4", source_sha256=None, status=Status.FAILED, reason="x"))
    return rows


def test_shards_are_bounded_and_hold_every_kept_clip(tmp_path):
    rows = _rows(tmp_path, 10)
    shard_of = pack_shards(
        rows, lambda r: tmp_path / f"{r.clip_id}.mp4", tmp_path / "shards", ShardParams(max_shard_mb=0.1)
    )
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert len(shards) == 5  # a third 50 kB clip would take a shard past 0.1 MB
    assert all(s.stat().st_size <= 0.1 * 2**20 + 10 * 1024 for s in shards)  # + tar headers
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(r.clip_id for r in rows if r.clip_id)
    assert set(shard_of) == {r.clip_id for r in rows if r.clip_id}


def test_a_crash_mid_pack_leaves_no_partial_shard_and_a_rerun_adds_no_duplicates(tmp_path):
    rows = _rows(tmp_path, 6)
    shard_dir = tmp_path / "shards"

    def flaky(row):
        if row.clip_id.endswith("4"):
            raise OSError("disk went away")
        return tmp_path / f"{row.clip_id}.mp4"

    with pytest.raises(OSError):
        pack_shards(rows, flaky, shard_dir, ShardParams(max_clips_per_shard=2))
    assert sorted(p.name for p in shard_dir.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]  # complete ones only
    pack_shards(rows, lambda r: tmp_path / f"{r.clip_id}.mp4", shard_dir, ShardParams(max_clips_per_shard=2))
    packed = packed_clips(shard_dir)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in shard_dir.glob("*.tar")), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 6 == len(packed)
