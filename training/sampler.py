"""The training order: one seeded global permutation per epoch over (clip, bucket) entries, batches formed within
buckets after the shuffle, and batches dealt round-robin to ranks and DataLoader workers.

Pure (no I/O): entries in, batches of clip ids out, so what each reader trains is known without reading a byte.
- Every entry appears `weight` times per epoch (`repeats` and `image_fraction` are weights; 0 leaves it out).
- A bucket's partial batch at the end of an epoch is carried into the next epoch, never dropped or padded: after
  any number of epochs every clip has been trained within one visit of every other (times its weight), and each
  bucket gives its share of the batches.
- Bucket b has emitted floor(e * n_b / batch_size) batches after e epochs (n_b: its weighted entries), whatever the
  order, so the epoch of a global batch index and the batches before it are arithmetic: a resume starts at its
  batch without replaying the stream (only the few earlier permutations that hold its carried-over entries).
- Global batch g goes to rank g % world_size; a rank's batches go to its DataLoader workers in turn (the DataLoader
  takes one from each worker in order), starting again from worker 0 at a resume.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    index: int  # position in the global order (across all ranks)
    epoch: int  # the epoch whose permutation completed it
    bucket: str
    clip_ids: tuple[str, ...]
    epochs: tuple[int, ...]  # the epoch each clip's entry belongs to (earlier for one carried over)


@dataclass(frozen=True)
class Reader:
    """One of the `world_size * workers` readers: a rank's DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    workers: int = 1

    @property
    def count(self) -> int:
        return self.world_size * self.workers


class GlobalOrder:
    """The batch sequence of a run: a pure function of (entries, weights, batch size, seed)."""

    def __init__(self, entries: dict[str, str], batch_size: int, seed: int, weights: dict[str, int] | None = None):
        """`entries`: clip id -> bucket key; `weights`: clip id -> times per epoch (missing: once, 0: left out)."""
        weights = weights or {}
        self.batch_size, self.seed = batch_size, seed
        # Sorted first, so the permutation does not depend on the order the index was read in.
        self.entries = [(c, entries[c]) for c in sorted(entries) for _ in range(weights.get(c, 1))]
        self.per_bucket: dict[str, int] = defaultdict(int)  # weighted entries per epoch
        for _, bucket in self.entries:
            self.per_bucket[bucket] += 1

    def __len__(self) -> int:
        """Weighted entries per epoch."""
        return len(self.entries)

    def permutation(self, epoch: int) -> list[tuple[str, str]]:
        order = list(self.entries)
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        return order

    def batches_before(self, epoch: int) -> int:
        """Global batches completed by the end of epoch `epoch - 1` (0 for epoch 0)."""
        return sum(epoch * n // self.batch_size for n in self.per_bucket.values())

    def epoch_of(self, index: int) -> int:
        """The epoch whose permutation completes global batch `index`."""
        if not self.entries:
            raise ValueError("no entries to order")
        high = 1
        while self.batches_before(high) <= index:
            high *= 2
        low = 0  # batches_before(low) <= index < batches_before(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.batches_before(middle) <= index else (low, middle)
        return low

    def _carried_into(self, epoch: int) -> dict[str, list[tuple[str, int]]]:
        """Per bucket, the entries appended before `epoch` that no batch has taken yet (fewer than a batch): the
        last ones of that bucket in the latest permutations."""
        carried: dict[str, list[tuple[str, int]]] = {}
        wanted = {b: epoch * n % self.batch_size for b, n in self.per_bucket.items()}
        wanted = {b: k for b, k in wanted.items() if k}
        earlier = epoch - 1
        history: dict[str, list[tuple[str, int]]] = defaultdict(list)  # (clip, epoch), oldest first
        while wanted and earlier >= 0:
            tails: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for clip, bucket in self.permutation(earlier):
                if bucket in wanted:
                    tails[bucket].append((clip, earlier))
            for bucket in list(wanted):
                history[bucket] = tails[bucket] + history[bucket]
                if len(history[bucket]) >= wanted[bucket]:
                    carried[bucket] = history[bucket][len(history[bucket]) - wanted.pop(bucket) :]
            earlier -= 1
        return carried

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Every global batch from index `start` on, endlessly."""
        epoch = self.epoch_of(start)
        index = self.batches_before(epoch)
        pending: dict[str, list[tuple[str, int]]] = defaultdict(list, self._carried_into(epoch))
        while True:
            for clip, bucket in self.permutation(epoch):
                pending[bucket].append((clip, epoch))
                if len(pending[bucket]) == self.batch_size:
                    if index >= start:
                        clips, epochs = zip(*pending[bucket])
                        yield Batch(index, epoch, bucket, clips, epochs)
                    pending[bucket] = []
                    index += 1
            epoch += 1


def owner(index: int, reader: Reader, resumed_at: int = 0) -> bool:
    """Whether global batch `index` is `reader`'s: the rank's by `index % world_size`, then the worker's by the
    rank's local batch count since the (re)start `resumed_at` (local batches already trained)."""
    if index % reader.world_size != reader.rank:
        return False
    local = index // reader.world_size
    return local >= resumed_at and (local - resumed_at) % reader.workers == reader.worker


def reader_batches(order: GlobalOrder, reader: Reader, resumed_at: int = 0) -> Iterator[Batch]:
    """The batches `reader` trains, in order, from the rank's local batch `resumed_at` on."""
    start = resumed_at * reader.world_size + reader.rank
    for batch in order.batches(start):
        if owner(batch.index, reader, resumed_at):
            yield batch
