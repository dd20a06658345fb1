"""Training data: curated shards checked before any model loads, and an endless stream of single-bucket batches
from the latent cache (default) or from the curated shards themselves (decoded and encoded on the fly).

The order is the run's global one (`vidtune.training.sampler`: a seeded permutation per epoch, batches within
buckets, dealt to ranks and workers); each reader finds its samples through the shards' tar headers
(`vidtune.training.shard_index`) and reads only those. A resumed run starts at its batch by arithmetic and sees
exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

from vidtune.training.cache import STILL_FRAMES, choose_bucket, decode_clip, load_cache_entry
from vidtune.training.families.base import TextEmbeddings
from vidtune.training.layout import DatasetLayout
from vidtune.training.sampler import GlobalOrder, Reader, reader_batches
from vidtune.training.shard_index import IndexedSample, SampleReader, index_shards


class DatasetError(ValueError):
    """The data cannot train this model: said before any model is loaded."""


EVALUATION_CLIPS = 8  # held-out clips below which the evaluation's intervals are too wide to say much


@dataclass(frozen=True)
class Holdout:
    clip_ids: list[str]
    note: str | None = None  # how they were chosen when not by whole sources, or that they are few


@dataclass(frozen=True)
class DatasetSummary:
    shards: list[str]
    clips: int
    buckets: Counter  # "FxHxW" -> clips that train in it
    too_short: list[int]  # frame counts of clips shorter than every bucket
    fitting_ids: list[str]  # kept clips that fit a bucket, sorted
    source_of: dict[str, str] = field(default_factory=dict)  # clip id -> the source it was cut from
    stills: set[str] = field(default_factory=set)  # ids of the clips that are images (single frames)
    start_of: dict[str, float] = field(default_factory=dict)  # clip id -> where it starts in its source (s)
    not_kept: int = 0  # clips still in the shards that the manifest now marks filtered or failed

    def holdout(self, count: int) -> Holdout:
        """About `count` clips kept out of training for evaluation, as whole sources (in an order fixed by their
        names), so the held-out loss does not reward memorising the videos training saw; training keeps at least
        half of the clips. With one source (or none small enough), its last clips in time instead, said in the
        note. Videos are preferred: evaluation compares videos when it can."""
        if count == 0:
            return Holdout([])
        if len(self.fitting_ids) <= count:
            raise DatasetError(
                f"holdout_clips: {count} held out of {len(self.fitting_ids)} usable clips leaves none to train on; lower holdout_clips"
            )
        videos = [i for i in self.fitting_ids if i not in self.stills]
        pool = videos if len(videos) > count else self.fitting_ids
        by_source: dict[str, list[str]] = {}
        for clip_id in pool:
            by_source.setdefault(self.source_of.get(clip_id, ""), []).append(clip_id)
        budget = len(self.fitting_ids) // 2
        chosen: list[str] = []
        for source in sorted(by_source, key=lambda s: hashlib.sha256(s.encode()).hexdigest()):
            if len(chosen) >= count:
                break
            if len(chosen) + len(by_source[source]) <= budget:
                chosen += by_source[source]
        note = None
        if not chosen:
            source = max(by_source, key=lambda s: (len(by_source[s]), s))
            latest = sorted(by_source[source], key=lambda c: (self.start_of.get(c, 0.0), c))
            chosen = latest[-min(count, budget) :]
            note = (
                f"held out the last {len(chosen)} clips in time of {Path(source).name or 'the only source'}: no "
                f"whole source could be held out ({len(by_source)} source(s)), so training saw other scenes of "
                "the same video and the held-out loss may reward memorising it"
            )
        if len(chosen) < EVALUATION_CLIPS:
            few = f"only {len(chosen)} held-out clips (fewer than {EVALUATION_CLIPS}): the evaluation's intervals are wide"
            note = f"{note}; {few}" if note else few
        return Holdout(sorted(chosen), note)


def kept_clip_ids(manifest: Path) -> set[str] | None:
    """The clips the manifest marks kept (None without a manifest): a rerun of curate with a tighter filter marks
    clips filtered that append-only shards still hold."""
    if not manifest.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["clip_id", "status"]).to_pydict()
    return {c for c, status in zip(table["clip_id"], table["status"]) if c and status == "kept"}


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


def summarize_dataset(
    data: str | Path, buckets: list[int], family_name: str, buckets_setting: str = "precompute.frame_buckets"
) -> DatasetSummary:
    """Which curated clips fit which bucket; raises DatasetError when nothing can train, naming `buckets_setting`
    (the key of the frame buckets in the command that reads the data: import-lora's is `frame_buckets`)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DatasetError(f"data: {data} does not exist; curate raw videos into it first (vidtune curate RAW {data})")
    layout = DatasetLayout(data)
    shards = layout.shard_files()
    if not shards:
        raise DatasetError(f"data: no shards in {layout.shards}; is {data} the OUTPUT of `vidtune curate`?")
    kept = kept_clip_ids(layout.manifest)
    fitting, too_short, ids, source_of, stills, start_of, not_kept = Counter(), [], [], {}, set(), {}, 0
    for shard in shards:
        for row in _clip_rows(Path(shard)):
            if kept is not None and row["clip_id"] not in kept:
                not_kept += 1
                continue
            source_of[row["clip_id"]], start_of[row["clip_id"]] = row["source"], row.get("start_s") or 0.0
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
            f"{clips} clips have {min(too_short)}-{max(too_short)} frames. Set {buckets_setting} to shorter "
            "lengths the family accepts, or curate longer clips (curate's scenes.min_clip_s and clips.fps; "
            "curate.scenes.min_clip_s and curate.clips.fps inside finetune)."
        )
    return DatasetSummary(shards, clips, fitting, too_short, sorted(ids), source_of, stills, start_of, not_kept)


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


CACHE_MEMBER = "latents.safetensors"  # what makes a cache sample (text and condition sit beside it)


def _cache_buckets(index: dict[str, IndexedSample], reader: SampleReader, buckets: list[int]) -> dict[str, str]:
    """clip id -> bucket of a latent cache sample: the folder its shard is in."""
    return {key: Path(s.shard).parent.name for key, s in index.items() if CACHE_MEMBER in s.extensions}


def _shard_buckets(index: dict[str, IndexedSample], reader: SampleReader, buckets: list[int]) -> dict[str, str]:
    """clip id -> bucket of a curated clip, from its manifest row (the `.json` member: the video is not read)."""
    out = {}
    for key, sample in index.items():
        if "json" in sample.extensions and "mp4" in sample.extensions:
            row = json.loads(reader.read(sample, {"json"})["json"])
            frames = choose_bucket(row["num_frames"], buckets)
            if frames is not None:
                out[key] = bucket_key(frames, row["height"], row["width"])
    return out


def _cache_item(sample: dict, bucket: str) -> dict:
    return {"clip_id": sample["__key__"], **load_cache_entry(sample)}


def _shard_item(sample: dict, bucket: str) -> dict:
    video = decode_clip(sample["mp4"], parse_bucket_key(bucket)[0])[0]  # the frames precompute would have encoded
    return {"clip_id": sample["__key__"], "video": video, "caption": sample["txt"].decode()}


@dataclass(frozen=True)
class _Source:
    buckets_of: Callable[[dict[str, IndexedSample], SampleReader, list[int]], dict[str, str]]
    to_item: Callable[[dict, str], dict]
    members: set[str] | None  # what an item needs (None: every member)


SOURCES = {
    "cache": _Source(_cache_buckets, _cache_item, None),
    "shards": _Source(_shard_buckets, _shard_item, {"mp4", "txt"}),
}


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
    if "latents" in items[0]:
        batch["latents"] = torch.stack([item["latents"] for item in items])
        batch["text"] = {key: torch.stack([item["text"][key] for item in items]) for key in items[0]["text"]}
        condition = items[0].get("condition", {})  # Wan image-to-video's first-frame latents and image tokens
        batch["condition"] = {k: torch.stack([item["condition"][k] for item in items]) for k in condition}
    else:
        batch["video"] = torch.stack([item["video"] for item in items])
        batch["captions"] = [item["caption"] for item in items]
    return batch


class BucketedStream(torch.utils.data.IterableDataset):
    """An endless stream of single-bucket batches in the run's global order (`vidtune.training.sampler`): this
    rank's and DataLoader worker's share of it, each sample read by seeking to it (nothing else is read)."""

    def __init__(
        self,
        samples: dict[str, IndexedSample],
        buckets: dict[str, str],
        to_item: Callable[[dict, str], dict],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        repeats: dict[str, int] | None = None,
        members: set[str] | None = None,
    ):
        super().__init__()
        self.samples, self.to_item, self.members = samples, to_item, members
        self.order = GlobalOrder(buckets, batch_size, seed, repeats)
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches
        self.files = SampleReader()
        if not len(self.order):
            raise DatasetError(
                "no trainable clips (after held-out, filtered, too-short and repeat-0 ones); curate more clips or "
                "lower holdout_clips"
            )

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = Reader(self.rank, self.world_size, worker, workers)
        for batch in reader_batches(self.order, reader, self.skip_batches):
            items = [self.to_item(self.files.read(self.samples[c], self.members), batch.bucket) for c in batch.clip_ids]
            yield {**collate(items), "bucket": batch.bucket, "epoch": batch.epoch}


def read_clips(source: str, shards: list[str], buckets: list[int], clip_ids: set[str]) -> Iterator[dict]:
    """One-clip batches of `clip_ids` in `shards` of `source` ("cache" or "shards"), in clip id order; only those
    clips are read."""
    kind, files = SOURCES[source], SampleReader()
    index = {key: s for key, s in index_shards(shards).items() if key in clip_ids}
    for key, bucket in sorted(kind.buckets_of(index, files, buckets).items()):
        yield {**collate([kind.to_item(files.read(index[key], kind.members), bucket)]), "bucket": bucket}
    files.close()


def first_frames(shards: list[str], clip_ids: list[str]) -> list:
    """The first frame (PIL, RGB) of each of `clip_ids` in the curated `shards`, in the order of `clip_ids` (those
    not found left out): an image-to-video run's conditioning images. Only these clips' videos are read."""
    from PIL import Image

    from vidtune.training.media import FrameReader

    index, files = index_shards(shards), SampleReader()
    found = [index[c] for c in clip_ids if c in index and "mp4" in index[c].extensions]
    frames = [Image.fromarray(FrameReader(files.read(s, {"mp4"})["mp4"]).get([0])[0]) for s in found]
    files.close()
    return frames


def make_stream(
    source: str,
    shards: list[str],
    buckets: list[int],
    *,
    exclude: frozenset[str] = frozenset(),
    clip_ids: set[str] | None = None,
    **kwargs,
) -> BucketedStream:
    """`source` "cache": shards of the latent cache; "shards": curated shards, decoded to video tensors. Trains
    the indexed clips in `clip_ids` (None: all) that are not in `exclude`; `kwargs` go to `BucketedStream`."""
    kind = SOURCES[source]
    index = index_shards(shards)
    index = {k: s for k, s in index.items() if k not in exclude and (clip_ids is None or k in clip_ids)}
    with_buckets = kind.buckets_of(index, SampleReader(), buckets)
    return BucketedStream(index, with_buckets, kind.to_item, members=kind.members, **kwargs)
