"""The training order at the scale real runs have: hundreds of clips from dozens of sources in four buckets (one of
them stills at 2 %), written to cache shards in curated order (one source's clips side by side), read by 1, 2, 3
and 8 readers. What trains is counted: visits per clip, bucket shares, runs of one bucket or one source, what each
reader reads, and what a resume reads."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from itertools import groupby, islice

import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_tensors

from vidtune.training.data import DatasetError, make_stream
from vidtune.training.sampler import GlobalOrder, Reader, reader_batches

BUCKET_SHARES = {"17x32x32": 0.5, "9x32x48": 0.3, "9x48x32": 0.18, "1x32x32": 0.02}
CLIPS, SOURCES, PER_SHARD, BATCH = 600, 30, 64, 2
READERS = [(1, 1), (2, 1), (3, 1), (4, 2)]  # (ranks, DataLoader workers): 1, 2, 3 and 8 readers


def _layout() -> tuple[dict[str, str], dict[str, str]]:
    """clip id -> bucket and clip id -> source, in curated order: each source's clips together, one size each."""
    rng = random.Random(5)
    bucket_of, source_of = {}, {}
    stills = round(CLIPS * BUCKET_SHARES["1x32x32"])
    for index in range(stills):  # one image each
        clip = f"still-{index:03d}"
        bucket_of[clip], source_of[clip] = "1x32x32", f"photo-{index:03d}.jpg"
    videos = [b for b in BUCKET_SHARES if b != "1x32x32"]
    weights = [BUCKET_SHARES[b] for b in videos]
    counts = Counter(rng.choices(videos, weights, k=CLIPS - stills))
    for bucket, count in counts.items():
        sources = [s for s in range(SOURCES) if s % len(videos) == videos.index(bucket)]
        for index in range(count):
            clip = f"{bucket}-{index:04d}"
            bucket_of[clip], source_of[clip] = bucket, f"video-{sources[index * len(sources) // count]:02d}.mp4"
    return bucket_of, source_of


BUCKET_OF, SOURCE_OF = _layout()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> list[str]:
    """A latent cache laid out as precompute writes it: <bucket>/cache-NNNNNN.tar, clips in curated order."""
    root, shards = tmp_path_factory.mktemp("cache"), []
    by_bucket = defaultdict(list)
    for clip, bucket in BUCKET_OF.items():
        by_bucket[bucket].append(clip)
    for bucket, clips in by_bucket.items():
        (root / bucket).mkdir()
        for start in range(0, len(clips), PER_SHARD):
            path = root / bucket / f"cache-{start // PER_SHARD:06d}.tar"
            with open(path, "wb") as stream, wds.TarWriter(stream) as writer:
                for clip in clips[start : start + PER_SHARD]:
                    moments = torch.full((8, 1, 2, 2), float(len(shards)))
                    writer.write(
                        {
                            "__key__": clip,
                            "latents.safetensors": save_tensors({"moments": moments}),
                            "text.safetensors": save_tensors({"embeds": torch.zeros(4, 8)}),
                        }
                    )
            shards.append(str(path))
    return shards


def _epochs_of_batches(order: GlobalOrder, epochs: int, readers: tuple[int, int]) -> dict[Reader, list]:
    """Each reader's batches among the global batches completed by the end of `epochs` epochs."""
    ranks, workers = readers
    end = order.batches_before(epochs)
    out = {}
    for rank in range(ranks):
        for worker in range(workers):
            reader = Reader(rank, ranks, worker, workers)
            out[reader] = [b for b in _until(reader_batches(order, reader), end)]
    return out


def _until(batches, end: int):
    for batch in batches:
        if batch.index >= end:
            return
        yield batch


def _max_run(labels: list) -> int:
    """The longest run of one label (None: no label, never a run)."""
    return max((len(list(group)) for label, group in groupby(labels) if label is not None), default=0)


def _source_of_batch(batch) -> str | None:
    sources = {SOURCE_OF[c] for c in batch.clip_ids}
    return sources.pop() if len(sources) == 1 else None


def _random_max_run(labels: list, rng: random.Random, trials: int = 100) -> float:
    """The mean longest run when the same batches come in a random order: what a well-shuffled stream shows."""
    runs = []
    for _ in range(trials):
        shuffled = list(labels)
        rng.shuffle(shuffled)
        runs.append(_max_run(shuffled))
    return sum(runs) / trials


@pytest.mark.parametrize("readers", READERS, ids=lambda r: f"{r[0]}x{r[1]}")
def test_every_clip_equally_often_each_bucket_its_share_and_no_clip_twice_in_an_epoch(readers):
    order, epochs = GlobalOrder(BUCKET_OF, BATCH, seed=3), 4
    dealt = _epochs_of_batches(order, epochs, readers)
    everything = [b for batches in dealt.values() for b in batches]
    assert sorted(b.index for b in everything) == list(range(order.batches_before(epochs)))  # each batch once
    visits = Counter(c for b in everything for c in b.clip_ids)
    assert set(visits) == set(BUCKET_OF)  # stills too
    assert max(visits.values()) - min(visits.values()) <= 1 and max(visits.values()) == epochs
    # The entries still waiting for a batch at the end: fewer than one batch per bucket.
    assert sum(epochs - v for v in visits.values()) < BATCH * len(BUCKET_SHARES)
    entries = Counter((c, e) for b in everything for c, e in zip(b.clip_ids, b.epochs))
    assert max(entries.values()) == 1  # no clip trained twice (by one reader or two) for one epoch
    trained = Counter(BUCKET_OF[c] for b in everything for c in b.clip_ids)
    clips = Counter(BUCKET_OF.values())
    for bucket, count in clips.items():
        assert abs(trained[bucket] - epochs * count) < BATCH  # each bucket's share, within one batch
    for reader, batches in dealt.items():  # and every reader trains every bucket near its share
        mine = Counter(b.bucket for b in batches)
        for bucket, count in clips.items():
            expected = epochs * count / BATCH / (readers[0] * readers[1])
            assert abs(mine[bucket] - expected) <= 4 * expected**0.5 + 1, (reader, bucket, mine[bucket], expected)


@pytest.mark.parametrize("readers", [(1, 1), (4, 2)], ids=lambda r: f"{r[0]}x{r[1]}")
def test_runs_of_one_bucket_or_one_source_are_what_a_random_order_gives(readers):
    """Shards hold one bucket and one source's scenes side by side; the order must not show it."""
    order, rng = GlobalOrder(BUCKET_OF, BATCH, seed=11), random.Random(0)
    for reader, batches in _epochs_of_batches(order, 4, readers).items():
        for label in (lambda b: b.bucket, _source_of_batch):
            labels = [label(b) for b in batches]
            assert _max_run(labels) <= 3 * _random_max_run(labels, rng), (reader, labels[:40])


def test_repeats_are_weights_of_the_permutation():
    weights = {c: 3 for c in list(BUCKET_OF)[:40]} | {c: 0 for c in list(BUCKET_OF)[40:50]}
    order, epochs = GlobalOrder(BUCKET_OF, BATCH, seed=1, weights=weights), 5
    visits = Counter(c for b in islice(order.batches(), order.batches_before(epochs)) for c in b.clip_ids)
    for clip in BUCKET_OF:
        expected = epochs * weights.get(clip, 1)
        assert expected - min(weights.get(clip, 1), BATCH - 1) <= visits[clip] <= expected, clip
    assert not set(list(BUCKET_OF)[40:50]) & set(visits)  # weight 0: left out


@pytest.mark.parametrize("start", [0, 1, 299, 300, 301, 1234, 4999])
def test_a_resume_starts_at_its_batch_by_arithmetic(start):
    """A small bucket (fewer clips than a batch) carries entries over several epochs: the hardest case."""
    entries = BUCKET_OF | {"lonely-a": "5x8x8", "lonely-b": "5x8x8"}
    order = GlobalOrder(entries, 3, seed=2)
    uninterrupted = list(islice(order.batches(), start + 20))
    assert list(islice(order.batches(start), 20)) == uninterrupted[start:]


def test_the_stream_reads_only_what_its_reader_trains_and_a_resume_reads_nothing_before_it(cache):
    stream = make_stream("cache", cache, [], batch_size=BATCH, seed=4, rank=1, world_size=2)
    order = reader_batches(GlobalOrder(BUCKET_OF, BATCH, seed=4), Reader(1, 2))
    first = list(islice(stream, 30))
    assert [tuple(b["clip_ids"]) for b in first] == [b.clip_ids for b in islice(order, 30)]
    assert stream.files.reads == 30 * BATCH  # the index came from tar headers; every read sample trained
    assert all(
        len({BUCKET_OF[c] for c in b["clip_ids"]}) == 1 and b["bucket"] == BUCKET_OF[b["clip_ids"][0]] for b in first
    )
    assert first[0]["latents"].shape == (BATCH, 8, 1, 2, 2)
    resumed = make_stream("cache", cache, [], batch_size=BATCH, seed=4, rank=1, world_size=2, skip_batches=25)
    batch = next(iter(resumed))
    assert batch["clip_ids"] == first[25]["clip_ids"] and resumed.files.reads == BATCH


def test_dataloader_workers_deal_the_rank_s_batches_in_turn_and_resume_in_step(cache):
    def take(skip: int, n: int) -> list[tuple[str, ...]]:
        stream = make_stream("cache", cache, [], batch_size=BATCH, seed=9, rank=0, world_size=2, skip_batches=skip)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        return [tuple(b["clip_ids"]) for b, _ in zip(loader, range(n))]

    expected = [b.clip_ids for b in islice(reader_batches(GlobalOrder(BUCKET_OF, BATCH, seed=9), Reader(0, 2)), 15)]
    assert take(0, 15) == expected
    assert take(5, 10) == expected[5:]


def test_held_out_and_not_kept_clips_never_train_whatever_the_cache_holds(cache):
    held_out = frozenset(list(BUCKET_OF)[:30])
    allowed = set(list(BUCKET_OF)[:500])  # the manifest's kept clips: the cache holds 100 more
    stream = make_stream("cache", cache, [], batch_size=BATCH, seed=0, exclude=held_out, clip_ids=allowed)
    trained = {c for b, _ in zip(stream, range(600)) for c in b["clip_ids"]}
    assert trained == allowed - held_out


def test_no_trainable_clip_is_said_up_front(cache):
    with pytest.raises(DatasetError, match="no trainable clips"):
        make_stream("cache", cache, [], batch_size=BATCH, seed=0, clip_ids=set())


def _summary(clips: dict[str, tuple[str, float]], stills: set[str] = frozenset()):
    """A dataset of `clips` (id -> (source, start s)), every clip fitting one bucket."""
    from vidtune.training.data import DatasetSummary

    ids = sorted(clips)
    source_of = {c: source for c, (source, _) in clips.items()}
    start_of = {c: start for c, (_, start) in clips.items()}
    return DatasetSummary([], len(ids), Counter({"9x32x32": len(ids)}), [], ids, source_of, set(stills), start_of)


def test_held_out_clips_are_whole_sources_and_training_keeps_at_least_half():
    clips = {f"{s:02d}-{i}": (f"/raw/video-{s:02d}.mp4", i * 2.0) for s in range(12) for i in range(s % 4 + 1)}
    summary = _summary(clips)
    held = summary.holdout(8)
    sources = {clips[c][0] for c in held.clip_ids}
    assert len(held.clip_ids) >= 8 and held.note is None
    assert all(clips[c][0] not in sources for c in set(clips) - set(held.clip_ids))  # no source on both sides
    assert len(held.clip_ids) <= len(clips) // 2
    assert summary.holdout(8) == held  # the same data: the same sources
    assert _summary(dict(reversed(list(clips.items())))).holdout(8) == held  # whatever order the shards list them


def test_one_source_holds_out_its_last_scenes_in_time_and_says_so():
    clips = {f"c{i:02d}": ("/raw/only.mp4", float(30 - i)) for i in range(20)}  # ids in reverse time order
    held = _summary(clips).holdout(4)
    assert sorted(held.clip_ids) == ["c00", "c01", "c02", "c03"]  # the four latest scenes
    assert "last 4 clips in time of only.mp4" in held.note and "fewer than 8" in held.note


def test_videos_are_held_out_before_stills():
    clips = {f"v{i}": (f"/raw/v{i}.mp4", 0.0) for i in range(6)} | {f"p{i}": (f"/raw/p{i}.jpg", 0.0) for i in range(20)}
    held = _summary(clips, stills={f"p{i}" for i in range(20)}).holdout(3)
    assert len(held.clip_ids) == 3 and all(c.startswith("v") for c in held.clip_ids)
