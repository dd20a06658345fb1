"""The manifest (one row per candidate clip and per failed/filtered source) and the run statistics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vidtune.tasks.files import atomic_path, write_json_atomic
from vidtune.tasks.records import MANIFEST_SCHEMA, ClipRecord, Status


def write_manifest(rows: list[ClipRecord], path: Path) -> None:
    ordered = sorted(rows, key=lambda r: (r.source, r.start_frame, r.clip_id or ""))
    table = pa.Table.from_pylist([r.to_dict() for r in ordered], schema=MANIFEST_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: Path) -> list[ClipRecord]:
    return [ClipRecord.from_dict(row) for row in pq.read_table(path).to_pylist()]


def reason_kind(reason: str) -> str:
    """The short head of a reason ("duplicate source", "too short", ...) for counting."""
    return reason.split(":", 1)[0].strip() or "unspecified"


def curate_stats(rows: list[ClipRecord], source_durations: dict[str, float], resumed: int, shards: int) -> dict:
    clip_rows = [r for r in rows if r.clip_id]
    source_rows = [r for r in rows if not r.clip_id]
    sources = {r.source for r in rows}
    failed_sources = {r.source for r in source_rows if r.status == Status.FAILED}
    no_clip_sources = {r.source for r in source_rows if r.status == Status.FILTERED}
    kept = [r for r in clip_rows if r.status == Status.KEPT]
    return {
        "sources": {
            "total": len(sources),
            "with_clips": len({r.source for r in kept}),
            "failed": len(failed_sources),
            "filtered": len(no_clip_sources),
            "resumed": resumed,
        },
        "clips": {s.value: sum(r.status == s for r in clip_rows) for s in Status},
        "hours_in": round(sum(source_durations.values()) / 3600, 6),
        "hours_out": round(sum(r.end_s - r.start_s for r in kept) / 3600, 6),
        "sizes": dict(Counter(f"{r.width}x{r.height}" for r in kept).most_common()),  # aspect-ratio buckets
        "media": dict(Counter(r.media for r in kept).most_common()),  # kept clips that are videos / images
        "clip_reasons": dict(
            Counter(reason_kind(r.reason) for r in clip_rows if r.status != Status.KEPT).most_common()
        ),
        "source_reasons": dict(Counter(reason_kind(r.reason) for r in source_rows).most_common()),
        "shards": shards,
    }


def write_stats(stats: dict, path: Path) -> None:
    write_json_atomic(path, stats)
