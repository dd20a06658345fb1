"""What trains at real scale: a latent cache laid out as precompute writes it (one folder per bucket, 256 clips a
shard, clips in curated order, so one source's scenes sit side by side) with 1,000 clips from 40 sources in four
buckets (stills 2 %), read by 1 to 8 readers (ranks x DataLoader workers) for four epochs through the real stream.

Prints, per reader count: the spread of visits per clip, each bucket's share of trained samples against its share
of clips, the longest run of one bucket and of one source in a reader's batches against what a random order of the
same batches gives (mean of 200 shuffles), and samples read per sample trained.

    .venv/bin/python bench/sampler.py [--clips 1000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter
from itertools import groupby
from pathlib import Path

import torch
import webdataset as wds
from safetensors.torch import save as save_tensors

from vidtune.training.data import make_stream

SHARES = {"17x32x32": 0.5, "9x32x48": 0.3, "9x48x32": 0.18, "1x32x32": 0.02}


def write_cache(root: Path, clips: int, sources: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Shards, clip -> bucket and clip -> source; each source's clips consecutive, in one bucket."""
    rng = random.Random(0)
    video_buckets = [b for b in SHARES if b != "1x32x32"]
    bucket_of, source_of = {}, {}
    for index in range(clips):
        if index < round(clips * SHARES["1x32x32"]):
            bucket, source = "1x32x32", f"photo-{index}"
        else:
            source_id = (index * sources) // clips
            bucket = video_buckets[source_id % 3] if rng.random() > 0.1 else rng.choice(video_buckets)
            source = f"video-{source_id:03d}"
        bucket_of[f"clip-{index:05d}"], source_of[f"clip-{index:05d}"] = bucket, source
    shards = []
    for bucket in SHARES:
        members = [c for c in bucket_of if bucket_of[c] == bucket]
        (root / bucket).mkdir(parents=True)
        for start in range(0, len(members), 256):
            path = root / bucket / f"cache-{start // 256:06d}.tar"
            with open(path, "wb") as stream, wds.TarWriter(stream) as writer:
                for clip in members[start : start + 256]:
                    writer.write(
                        {
                            "__key__": clip,
                            "latents.safetensors": save_tensors({"moments": torch.zeros(8, 1, 2, 2)}),
                            "text.safetensors": save_tensors({"embeds": torch.zeros(4, 8)}),
                        }
                    )
            shards.append(str(path))
    return shards, bucket_of, source_of


def longest_run(labels: list) -> int:
    return max((len(list(g)) for label, g in groupby(labels) if label is not None), default=0)


def random_run(labels: list, rng: random.Random, trials: int = 200) -> float:
    total = 0
    for _ in range(trials):
        shuffled = list(labels)
        rng.shuffle(shuffled)
        total += longest_run(shuffled)
    return total / trials


def measure(shards, bucket_of, source_of, ranks: int, workers: int, epochs: int, batch_size: int) -> dict:
    steps = epochs * len(bucket_of) // (batch_size * ranks * workers)  # per reader
    per_reader, reads = [], 0
    for rank in range(ranks):
        stream = make_stream("cache", shards, [], batch_size=batch_size, seed=0, rank=rank, world_size=ranks)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers if workers > 1 else 0)
        batches = [b for b, _ in zip(loader, range(steps * workers))]
        for worker in range(workers):  # the loader takes one batch from each worker in turn
            per_reader.append(batches[worker::workers])
        reads += stream.files.reads  # counted in this process only (workers > 1 read in theirs)
    trained = Counter(c for batches in per_reader for b in batches for c in b["clip_ids"])
    samples = sum(trained.values())
    clips = Counter(bucket_of.values())
    shares = {
        b: (Counter(bucket_of[c] for c in trained.elements())[b] / samples, clips[b] / len(bucket_of)) for b in SHARES
    }
    rng = random.Random(1)
    runs = {"bucket": [0, 0.0], "source": [0, 0.0]}
    for batches in per_reader:
        for name, label in (("bucket", lambda b: b["bucket"]), ("source", lambda b: _one_source(b, source_of))):
            labels = [label(b) for b in batches]
            runs[name][0] = max(runs[name][0], longest_run(labels))
            runs[name][1] = max(runs[name][1], random_run(labels, rng))
    visits = [trained.get(c, 0) for c in bucket_of]
    read = reads / samples if workers == 1 else None
    return {"visits": (min(visits), max(visits)), "shares": shares, "runs": runs, "read_per_trained": read}


def _one_source(batch: dict, source_of: dict[str, str]) -> str | None:
    sources = {source_of[c] for c in batch["clip_ids"]}
    return sources.pop() if len(sources) == 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards, bucket_of, source_of = write_cache(Path(folder), args.clips, args.sources)
        print(
            f"{args.clips} clips, {args.sources} sources, {len(shards)} shards, batch {args.batch_size}, {args.epochs} epochs"
        )
        print(f"{'readers':>8} {'visits/clip':>12} {'stills: samples vs clips':>26} {'longest bucket run':>19} "
              f"{'longest source run':>19} {'read/trained':>13}")  # fmt: skip
        for ranks, workers in ((1, 1), (2, 1), (3, 1), (3, 2), (4, 2)):
            m = measure(shards, bucket_of, source_of, ranks, workers, args.epochs, args.batch_size)
            still, clips = m["shares"]["1x32x32"]
            bucket, source = m["runs"]["bucket"], m["runs"]["source"]
            print(
                f"{ranks}x{workers:<6} {m['visits'][0]:>5}-{m['visits'][1]:<6} {still:>12.1%} vs {clips:<10.1%} "
                f"{bucket[0]:>6} (random {bucket[1]:4.1f}) {source[0]:>6} (random {source[1]:4.1f}) "
                f"{m['read_per_trained'] or float('nan'):>12.2f}"
            )


if __name__ == "__main__":
    main()
