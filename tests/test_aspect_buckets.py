"""Aspect-ratio buckets from curation to training: landscape and portrait footage curated at their own sizes, cached
per (frames, height, width), trained in batches that never mix sizes, and sampled at a size the run trained on.
Images curated beside the videos train as single frames in their own bucket, weighted by image_fraction."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.discover import identify_source
from vidtune.tasks.manifest import write_manifest
from vidtune.tasks.output import OutputLayout
from vidtune.tasks.records import Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.shards import ShardParams, pack_shards
from vidtune.tasks.source import SourceSettings, curate_source
from vidtune.tasks.synthetic_videos import render_video
from vidtune.training.cache import PrecomputeParams, frame_buckets, precompute
from vidtune.training.data import (
    cache_shards,
    combined_repeats,
    make_stream,
    still_repeats,
    summarize_dataset,
    validation_size,
)
from vidtune.training.families import get_family

LANDSCAPE, PORTRAIT, STILLS = "9x48x64", "9x64x48", "1x48x64"


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """A letterboxed landscape source, a phone-portrait source and two photos, curated into one dataset (64x48 /
    48x64; the photos are single-frame clips)."""
    raw, layout = tmp_path_factory.mktemp("raw"), OutputLayout(tmp_path_factory.mktemp("data"))
    videos = [
        render_video(raw / "wide.mp4", seconds=6, fps=24, width=320, height=240, shots=3, bars=(0, 30, 0, 30), seed=5),
        render_video(raw / "phone.mp4", seconds=6, fps=30, width=180, height=320, shots=3, seed=6),
    ]
    for seed, name in ((7, "poster.jpg"), (8, "still.png")):
        pixels = np.random.default_rng(seed).integers(40, 220, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(raw / name)
    settings = SourceSettings(
        SceneParams(),
        ClipParams(buckets=["64x48", "48x64"], fps=8),
        CaptionParams(trigger="sks"),
        ScoreParams(clip=False, motion=False),
    )
    rows = []
    for path in [str(v.path) for v in videos] + [str(raw / "poster.jpg"), str(raw / "still.png")]:
        source = identify_source(path, layout.downloads)
        rows += curate_source(source, settings, layout.staging).rows
    shard_of = pack_shards(
        rows, lambda r: layout.staging / r.source_sha256 / f"{r.clip_id}.mp4", layout.shards, ShardParams()
    )
    for row in rows:
        row.shard = shard_of.get(row.clip_id)
    write_manifest(rows, layout.manifest)
    return layout, rows


def test_each_source_keeps_its_orientation(mixed_dataset):
    _, rows = mixed_dataset
    sizes = {(r.source.rsplit("/", 1)[-1], r.width, r.height) for r in rows if r.status == Status.KEPT}
    assert sizes == {("wide.mp4", 64, 48), ("phone.mp4", 48, 64), ("poster.jpg", 64, 48), ("still.png", 64, 48)}


def test_precompute_and_training_take_the_curated_buckets_as_they_are(mixed_dataset, tmp_path):
    from tests.test_train import make_job
    from vidtune.training.tiny_models import build_tiny_wan
    from vidtune.training.trainer import train

    layout, _ = mixed_dataset
    family = get_family("wan")
    buckets = frame_buckets(family, PrecomputeParams(frame_buckets=[9]))
    assert buckets == [1, 9]  # Wan's VAE takes a single frame: stills get their bucket
    summary = summarize_dataset(layout.root, buckets, "wan")
    assert set(summary.buckets) == {LANDSCAPE, PORTRAIT, STILLS} and summary.buckets[STILLS] == 2
    assert validation_size(summary.buckets) in {(9, 48, 64), (9, 64, 48)}  # samples are videos

    model = str(build_tiny_wan(tmp_path / "wan"))
    result = precompute(
        summary.shards,
        family,
        family.load_pipeline(model),
        model,
        tmp_path / "cache",
        PrecomputeParams(frame_buckets=[9]),
    )
    assert result.encoded == sum(summary.buckets.values())
    shards = cache_shards(result.cache_dir)
    assert {p.split("/")[-2] for p in shards} == {LANDSCAPE, PORTRAIT, STILLS}

    # Latent grids follow the bucket (VAE: 8x spatial, 4x in time after the first frame); a batch holds one bucket,
    # and every bucket is trained.
    stream = iter(make_stream("cache", shards, buckets, batch_size=2, seed=0))
    seen = Counter()
    for _ in range(12):
        batch = next(stream)
        frames, height, width = batch["latents"].shape[-3:]
        seen[(frames, height * 8, width * 8)] += 1
    assert set(seen) == {(3, 48, 64), (3, 64, 48), (1, 48, 64)}

    job = make_job(model, shards, tmp_path / "run", batch_size=2, max_steps=4, checkpoint_every=4)
    job = job.model_copy(update={"frame_buckets": buckets, "sample_size": validation_size(summary.buckets)})
    trained = train(job)
    assert len(trained.losses) == 4 and all(torch.isfinite(torch.tensor(trained.losses)))


def test_repeats_weight_sources_by_path_or_name(mixed_dataset):
    from vidtune.training.data import clip_repeats

    layout, rows = mixed_dataset
    summary = summarize_dataset(layout.root, [9], "wan")
    phone = {r.clip_id for r in rows if r.status == Status.KEPT and r.source.endswith("phone.mp4")}
    assert phone and set(summary.source_of) == {r.clip_id for r in rows if r.status == Status.KEPT}
    assert clip_repeats({"phone*": 3}, summary.source_of) == dict.fromkeys(phone, 3)
    assert clip_repeats({"*/phone.mp4": 2, "phone*": 3}, summary.source_of) == dict.fromkeys(phone, 2)  # first wins
    assert clip_repeats({"nothing*": 5}, summary.source_of) == {}


def test_image_fraction_weights_stills_against_videos(mixed_dataset):
    layout, rows = mixed_dataset
    summary = summarize_dataset(layout.root, [1, 9], "wan")
    stills = {r.clip_id for r in rows if r.media == "image"}
    videos = [i for i in summary.fitting_ids if i not in stills]
    assert summary.stills == stills and len(stills) == 2 and len(videos) >= 4

    def share_of_stills(weights: dict[str, int]) -> float:
        counts = {i: weights.get(i, 1) for i in summary.fitting_ids}
        return sum(counts[i] for i in stills) / sum(counts.values())

    assert still_repeats(None, summary.stills, summary.fitting_ids) == {}
    assert share_of_stills(still_repeats(0, summary.stills, summary.fitting_ids)) == 0
    assert share_of_stills(still_repeats(1, summary.stills, summary.fitting_ids)) == 1
    for fraction in (0.05, 0.5, 0.8):  # fewer stills than asked: they repeat; more: the videos do
        weights = still_repeats(fraction, summary.stills, summary.fitting_ids)
        assert weights and abs(share_of_stills(weights) - fraction) < 0.12, (fraction, weights)
    # With per-source repeats the weights multiply.
    phone = {r.clip_id for r in rows if r.source.endswith("phone.mp4") and r.status == Status.KEPT}
    video_weight = still_repeats(0.05, summary.stills, summary.fitting_ids)
    both = combined_repeats(dict.fromkeys(phone, 3), video_weight)
    assert phone and all(both[i] == 3 * video_weight[i] > 3 for i in phone)
    # Evaluation holds out videos while there are enough.
    assert not set(summary.holdout(2).clip_ids) & stills
