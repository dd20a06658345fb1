"""Where each sample's members lie in a set of tar shards (read from the tar headers only), and reading one sample
by seeking to them: a reader reads the samples it trains on and nothing else.

A sample is a dict as webdataset gives it (`__key__`, `__url__`, and one bytes value per member extension), so
the same item builders serve the latent cache and the curated shards.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class IndexedSample:
    key: str
    shard: str
    members: tuple[tuple[str, int, int], ...]  # (extension, data offset, size)

    @property
    def extensions(self) -> set[str]:
        return {ext for ext, _, _ in self.members}


def index_shard(shard: str | Path) -> dict[str, IndexedSample]:
    """key -> its members in one tar shard (webdataset's split: the key is the name up to its first dot)."""
    members: dict[str, list[tuple[str, int, int]]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            if not info.isfile() or "." not in info.name:
                continue
            key, ext = info.name.split(".", 1)
            members.setdefault(key, []).append((ext, info.offset_data, info.size))
    return {key: IndexedSample(key, str(shard), tuple(found)) for key, found in members.items()}


def index_shards(shards: list[str]) -> dict[str, IndexedSample]:
    """key -> sample over `shards` in sorted order; a key in two shards keeps its first."""
    index: dict[str, IndexedSample] = {}
    for shard in sorted(shards):
        for key, sample in index_shard(shard).items():
            index.setdefault(key, sample)
    return index


class SampleReader:
    """Reads indexed samples, keeping a few shard files open (one reader per DataLoader worker: not shared)."""

    def __init__(self, open_files: int = 8):
        self.open_files = open_files
        self.files: OrderedDict[str, object] = OrderedDict()
        self.reads = 0  # samples read, for tests and progress

    def _file(self, shard: str):
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        if len(self.files) >= self.open_files:
            self.files.popitem(last=False)[1].close()
        self.files[shard] = handle = open(shard, "rb")  # noqa: SIM115 (kept open across reads; closed on eviction)
        return handle

    def read(self, sample: IndexedSample, extensions: set[str] | None = None) -> dict:
        """The sample's members (only `extensions` when given) as webdataset would yield them."""
        handle = self._file(sample.shard)
        out: dict = {"__key__": sample.key, "__url__": sample.shard}
        for ext, offset, size in sample.members:
            if extensions is None or ext in extensions:
                handle.seek(offset)
                out[ext] = handle.read(size)
        self.reads += 1
        return out

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()

    def __getstate__(self) -> dict:  # a DataLoader worker gets its own files
        return {"open_files": self.open_files, "files": OrderedDict(), "reads": 0}
