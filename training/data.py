"""Training data: curated shards checked before any model loads, and an endless stream of single-bucket batches
from the latent cache (default) or from the curated shards themselves (decoded and encoded on the fly).

Every rank and DataLoader worker reads a disjoint part of the data: whole shards when there are enough of them,
else every n-th sample. The stream is a pure function of (seed, epoch, rank, worker), so a resumed run skips
the batches it already trained on and sees exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
import webdataset as wds

from vidtune.training.cache import STILL_FRAMES, choose_bucket, decode_clip, load_cache_entry
from vidtune.training.families.base import TextEmbeddings
from vidtune.training.layout import DatasetLayout


class DatasetError(ValueError):
    """The data cannot train this model: said before any model is loaded."""


@dataclass(frozen=True)
class DatasetSummary:
    shards: list[str]
    clips: int
    buckets: Counter  # "FxHxW" -> clips that train in it
    too_short: list[int]  # frame counts of clips shorter than every bucket
    fitting_ids: list[str]  # clips that fit a bucket, sorted
    source_of: dict[str, str] = field(default_factory=dict)  # clip id -> the source it was cut from
    stills: set[str] = field(default_factory=set)  # ids of the clips that are images (single frames)

    def holdout(self, count: int) -> list[str]:
        """`count` clips kept out of training for evaluation: the same ones for the same data (ids are hashes)."""
        if count and len(self.fitting_ids) <= count:
            raise DatasetError(
                f"holdout_clips: {count} held out of {len(self.fitting_ids)} usable clips leaves none to train on; lower holdout_clips"
            )
        videos = [i for i in self.fitting_ids if i not in self.stills]  # evaluation compares videos when it can
        return (videos if len(videos) > count else self.fitting_ids)[:count]


def bucket_key(frames: int, height: int, width: int) -> str:
    return f"{frames}x{height}x{width}"


def parse_bucket_key(key: str) -> tuple[int, int, int]:
    frames, height, width = (int(v) for v in key.split("x"))
    return frames, height, width


def _clip_rows(shard: Path) -> Iterator[dict]:
    """The manifest rows stored in a curated shard, reading only its `.json` members (video bytes are skipped)."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                yield json.load(tar.extractfile(member))


def summarize_dataset(data: str | Path, buckets: list[int], family_name: str) -> DatasetSummary:
    """Which curated clips fit which bucket; raises DatasetError when nothing can train."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DatasetError(f"data: {data} does not exist; curate raw videos into it first (vidtune curate RAW {data})")
    layout = DatasetLayout(data)
    shards = layout.shard_files()
    if not shards:
        raise DatasetError(f"data: no shards in {layout.shards}; is {data} the OUTPUT of `vidtune curate`?")
    fitting, too_short, ids, source_of, stills = Counter(), [], [], {}, set()
    for shard in shards:
        for row in _clip_rows(Path(shard)):
            source_of[row["clip_id"]] = row["source"]
            if row.get("media") == "image":
                stills.add(row["clip_id"])
            frames = choose_bucket(row["num_frames"], buckets)
            if frames is None:
                too_short.append(row["num_frames"])
            else:
                fitting[bucket_key(frames, row["height"], row["width"])] += 1
                ids.append(row["clip_id"])
    clips = sum(fitting.values()) + len(too_short)
    if clips == 0:
        raise DatasetError(f"data: the shards in {layout.shards} hold no clips (see {layout.manifest} for why)")
    if not fitting:
        video_buckets = sorted(b for b in buckets if b != STILL_FRAMES)  # stills have their own, not worth naming
        raise DatasetError(
            f"data: no clip fits a frame bucket of {family_name} ({', '.join(map(str, video_buckets))} frames): the "
            f"{clips} clips have {min(too_short)}-{max(too_short)} frames. Set precompute.frame_buckets to shorter "
            "lengths the family accepts, or curate longer clips (scenes.min_clip_s, clips.fps)."
        )
    return DatasetSummary(shards, clips, fitting, too_short, sorted(ids), source_of, stills)


def clip_repeats(repeats: dict[str, int], source_of: dict[str, str]) -> dict[str, int]:
    """clip id -> times per epoch, for the clips whose source matches a glob of `repeats` (by path or file name;
    the first matching glob wins); other clips train once and are left out."""
    counts = {}
    for clip_id, source in source_of.items():
        name = source.rstrip("/").rsplit("/", 1)[-1]
        count = next((n for glob, n in repeats.items() if fnmatch(source, glob) or fnmatch(name, glob)), 1)
        if count != 1:
            counts[clip_id] = count
    return counts


def still_repeats(fraction: float | None, stills: set[str], clip_ids: list[str]) -> dict[str, int]:
    """clip id -> times per epoch that make stills about `fraction` of an epoch's samples: whole repeats of the
    stills, or of the videos when stills are too many (0: stills left out; 1: videos left out; None: as curated)."""
    still_ids = [c for c in clip_ids if c in stills]
    video_ids = [c for c in clip_ids if c not in stills]
    if fraction is None or not still_ids:
        return {}
    if fraction == 0 or fraction == 1:
        return dict.fromkeys(still_ids if fraction == 0 else video_ids, 0)
    if not video_ids:
        return {}
    per_video = fraction * len(video_ids) / ((1 - fraction) * len(still_ids))  # still repeats per video repeat
    if per_video >= 1:
        return dict.fromkeys(still_ids, round(per_video))
    return dict.fromkeys(video_ids, round(1 / per_video))


def combined_repeats(*weights: dict[str, int]) -> dict[str, int]:
    """The product of per-clip repeat counts (a clip missing from one counts once there); entries of 1 left out."""
    product: dict[str, int] = {}
    for weight in weights:
        for clip_id, count in weight.items():
            product[clip_id] = product.get(clip_id, 1) * count
    return {clip_id: count for clip_id, count in product.items() if count != 1}


def validation_size(buckets: Counter) -> tuple[int, int, int]:
    """(frames, height, width) that samples render at by default: a bucket the run trains on, the shortest video
    one, at the size (aspect ratio) most of its clips have."""
    videos = [k for k in buckets if parse_bucket_key(k)[0] != STILL_FRAMES] or list(buckets)
    key = min(videos, key=lambda k: (parse_bucket_key(k)[0], -buckets[k], k))
    return parse_bucket_key(key)


def cache_shards(cache_dir: Path, buckets: set[str] | None = None) -> list[str]:
    """Shards of the latent cache, only those of `buckets` ("FxHxW") when given (the cache keeps every bucket it
    ever encoded; a run trains on the ones it asks for)."""
    return sorted(str(p) for p in cache_dir.glob("*x*x*/cache-*.tar") if buckets is None or p.parent.name in buckets)


def _cache_bucket(sample: dict) -> str:
    return Path(sample["__url__"]).parent.name


def _cache_item(sample: dict, bucket: str) -> dict:
    return {"clip_id": sample["__key__"], **load_cache_entry(sample)}


class _ShardBucket:
    """Bucket of a curated clip (picklable for DataLoader workers)."""

    def __init__(self, buckets: list[int]):
        self.buckets = buckets

    def __call__(self, sample: dict) -> str | None:
        row = json.loads(sample["json"])
        frames = choose_bucket(row["num_frames"], self.buckets)
        return None if frames is None else bucket_key(frames, row["height"], row["width"])


def _shard_item(sample: dict, bucket: str) -> dict:
    video = decode_clip(sample["mp4"], parse_bucket_key(bucket)[0])[0]  # the frames precompute would have encoded
    return {"clip_id": sample["__key__"], "video": video, "caption": sample["txt"].decode()}


def caption_dropped(seed: int, batch_index: int, clip_id: str, probability: float) -> bool:
    """Whether this clip trains with the empty prompt in this batch: a pure function of (seed, batch, clip), so a
    resumed run drops the same captions as an uninterrupted one."""
    return probability > 0 and random.Random(f"{seed}/{batch_index}/{clip_id}").random() < probability


def drop_captions(batch: dict, dropped: list[bool], empty: TextEmbeddings | None = None) -> dict:
    """`batch` with the prompts of the `dropped` clips replaced by the empty prompt: the caption "" for clips
    encoded on the fly, the empty prompt's embeddings `empty` (batch dimension 1) for cached ones."""
    if not any(dropped):
        return batch
    if "captions" in batch:
        return {**batch, "captions": ["" if drop else c for drop, c in zip(dropped, batch["captions"])]}
    rows = torch.tensor(dropped)
    text = {}
    for name, tensor in batch["text"].items():
        text[name] = tensor.clone()
        text[name][rows] = getattr(empty, name)[0].to(tensor.dtype)
    return {**batch, "text": text}


def collate(items: list[dict]) -> dict:
    batch: dict = {"clip_ids": [item["clip_id"] for item in items]}
    if "moments" in items[0]:
        batch["moments"] = torch.stack([item["moments"] for item in items])
        batch["text"] = {key: torch.stack([item["text"][key] for item in items]) for key in items[0]["text"]}
        condition = items[0].get("condition", {})  # Wan image-to-video's first-frame latents and image tokens
        batch["condition"] = {k: torch.stack([item["condition"][k] for item in items]) for k in condition}
    else:
        batch["video"] = torch.stack([item["video"] for item in items])
        batch["captions"] = [item["caption"] for item in items]
    return batch


class BucketedStream(torch.utils.data.IterableDataset):
    """An endless stream of batches, each from one bucket, disjoint across ranks and workers."""

    def __init__(
        self,
        shards: list[str],
        bucket_of: Callable[[dict], str | None],
        to_item: Callable[[dict, str], dict],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        skip_batches: int = 0,
        exclude: frozenset[str] = frozenset(),
        repeats: dict[str, int] | None = None,
    ):
        super().__init__()
        self.exclude = exclude  # clip ids held out of training
        self.repeats = repeats or {}  # clip id -> times per epoch (others: once)
        self.shards, self.bucket_of, self.to_item = sorted(shards), bucket_of, to_item
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer, self.skip_batches = shuffle_buffer, skip_batches

    def _my_samples(self, part: int, parts: int, rng: random.Random) -> Iterator[dict]:
        for sample in self._my_shard_samples(part, parts, rng):
            for _ in range(self.repeats.get(sample["__key__"], 1)):  # the shuffle buffer spreads the copies apart
                yield sample

    def _my_shard_samples(self, part: int, parts: int, rng: random.Random) -> Iterator[dict]:
        if len(self.shards) >= parts:  # whole shards per reader: nobody reads what it does not train on
            mine = self.shards[part::parts]
            rng.shuffle(mine)
            yield from wds.tarfile_to_samples()(iter([{"url": url} for url in mine]))
            return
        samples = wds.tarfile_to_samples()(iter([{"url": url} for url in self.shards]))
        for index, sample in enumerate(samples):  # few shards: every reader takes every parts-th sample
            if index % parts == part:
                yield sample

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, always starting with worker 0. After skipping
        # k batches the next one was worker k % workers's, so each worker plays the role that keeps that order.
        worker = (worker + self.skip_batches) % workers
        part, parts = self.rank * workers + worker, self.world_size * workers
        skip = len(range(worker, self.skip_batches, workers))
        pending: dict[str, list[dict]] = defaultdict(list)
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}/{epoch}/{part}")
            seen = 0
            for sample in wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                self._my_samples(part, parts, rng)
            ):
                if sample["__key__"] in self.exclude:
                    continue
                key = self.bucket_of(sample)
                if key is None:
                    continue
                seen += 1
                pending[key].append(sample)
                if len(pending[key]) < self.batch_size:
                    continue
                raw = pending.pop(key)
                if skip:  # already trained on before a resume: not decoded
                    skip -= 1
                    continue
                yield collate([self.to_item(s, key) for s in raw])
            if not seen:
                raise DatasetError(
                    f"rank {self.rank} worker {worker} has no trainable clips (after held-out and too-short ones): "
                    f"fewer usable clips or shards than readers ({parts}); lower num_processes or data_workers"
                )
            epoch += 1


def read_clips(source: str, shards: list[str], buckets: list[int], clip_ids: set[str]) -> Iterator[dict]:
    """One pass over the shards of `source` ("cache" or "shards"), yielding one-clip batches of `clip_ids`."""
    bucket_of, to_item = (_cache_bucket, _cache_item) if source == "cache" else (_ShardBucket(buckets), _shard_item)
    for sample in wds.tarfile_to_samples()(iter([{"url": url} for url in sorted(shards)])):
        if sample["__key__"] in clip_ids and (key := bucket_of(sample)) is not None:
            yield collate([to_item(sample, key)])


def first_frames(shards: list[str], clip_ids: list[str]) -> list:
    """The first frame (PIL, RGB) of each of `clip_ids` in the curated `shards`, in the order of `clip_ids` (those
    not found left out): an image-to-video run's conditioning images. Only these clips' videos are decoded."""
    from PIL import Image

    from vidtune.training.media import FrameReader

    wanted, found = set(clip_ids), {}
    for sample in wds.tarfile_to_samples()(iter([{"url": url} for url in sorted(shards)])):
        if sample["__key__"] in wanted and "mp4" in sample:
            found[sample["__key__"]] = Image.fromarray(FrameReader(sample["mp4"]).get([0])[0])
    return [found[clip_id] for clip_id in clip_ids if clip_id in found]


def make_stream(source: str, shards: list[str], buckets: list[int], **kwargs) -> BucketedStream:
    """`source` "cache": shards of the latent cache; "shards": curated shards, decoded to video tensors."""
    if source == "cache":
        return BucketedStream(shards, _cache_bucket, _cache_item, **kwargs)
    return BucketedStream(shards, _ShardBucket(buckets), _shard_item, **kwargs)
