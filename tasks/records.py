"""Typed records that flow between curation stages and end up as manifest rows."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

import pyarrow as pa

# Fixed namespace: clip ids are reproducible across machines and runs.
CLIP_NAMESPACE = uuid.UUID("6f1c1c52-5b43-4e0c-9a57-8f0e7c2d9a11")


class Status(str, Enum):
    KEPT = "kept"
    FILTERED = "filtered"
    FAILED = "failed"


def clip_id_for(source_sha256: str, start_frame: int, end_frame: int) -> str:
    """Deterministic clip id: uuid5 of (source sha256, start frame, end frame)."""
    return str(uuid.uuid5(CLIP_NAMESPACE, f"{source_sha256}:{start_frame}:{end_frame}"))


@dataclass(frozen=True)
class Source:
    """One discovered input file. `error` is set when it could not even be read."""

    path: str  # local path or fsspec URL, as the user named it
    sha256: str | None
    size_bytes: int
    local_path: str | None = None  # where decoders read it (a cached download for remote URLs)
    duplicate_of: str | None = None
    error: str | None = None
    sidecar: str | None = None  # caption text from VIDEO.txt or a captions.csv/.jsonl mapping


@dataclass
class ClipRecord:
    """One manifest row: a candidate clip, or a source-level failure/filter (clip_id is None then)."""

    clip_id: str | None
    source: str
    source_sha256: str | None
    media: str = "video"  # "image": a still (jpg/png/webp) curated as a one-frame clip
    start_s: float = 0.0
    end_s: float = 0.0
    start_frame: int = 0
    end_frame: int = 0
    num_frames: int = 0
    fps: float = 0.0
    width: int = 0  # the clip's training size (its aspect-ratio bucket); the source's size on source rows
    height: int = 0
    crop_left: int = 0  # the shot's picture inside letterbox/pillarbox bars, in source display pixels
    crop_top: int = 0
    active_width: int = 0
    active_height: int = 0
    caption: str = ""
    clip_score: float | None = None
    motion_score: float | None = None
    text_area: float | None = None  # share of the frame covered by detected text (OCR), the most over sampled frames
    aesthetic_score: float | None = None  # the LAION aesthetic predictor on the CLIP embedding (about 1-10)
    status: Status = Status.KEPT
    reason: str = ""
    shard: str | None = None

    def to_dict(self) -> dict:
        row = asdict(self)
        row["status"] = Status(self.status).value
        return row

    @classmethod
    def from_dict(cls, row: dict) -> ClipRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        values["status"] = Status(values.get("status", "kept"))
        return cls(**values)

    @classmethod
    def for_source(cls, source: Source, status: Status, reason: str, **extra) -> ClipRecord:
        return cls(clip_id=None, source=source.path, source_sha256=source.sha256, status=status, reason=reason, **extra)


@dataclass
class SourceResult:
    rows: list[ClipRecord]
    resumed: bool = False  # rows came from an earlier run's staging
    duration_s: float = 0.0
    cuts: list[int] = field(default_factory=list)  # detected hard cuts (first frame of the new shot)
    gradual: list[tuple[int, int]] = field(default_factory=list)  # detected fades/dissolves (inclusive)
    sampled: dict = field(default_factory=dict)  # clip_id -> SampledFrames taken while writing (in memory only)


MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("media", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("crop_left", pa.int64()),
        ("crop_top", pa.int64()),
        ("active_width", pa.int64()),
        ("active_height", pa.int64()),
        ("caption", pa.string()),
        ("clip_score", pa.float64()),
        ("motion_score", pa.float64()),
        ("text_area", pa.float64()),
        ("aesthetic_score", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("shard", pa.string()),
    ]
)
assert MANIFEST_SCHEMA.names == [f.name for f in fields(ClipRecord)], "manifest schema and ClipRecord drifted"
