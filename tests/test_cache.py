"""The latent/text cache on real curated shards and a tiny Wan: buckets, reuse, incremental adds, fingerprints,
and clips too short for any bucket."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from vidtune.training.cache import (
    PrecomputeParams,
    cache_fingerprint,
    choose_bucket,
    load_cache_entry,
    load_encoders,
    precompute,
)
from vidtune.training.families import FAMILIES, get_family
from vidtune.training.tiny_models import build_tiny_wan


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    folder = build_tiny_wan(tmp_path_factory.mktemp("wan") / "model")
    family = get_family("wan")
    return family, family.load_pipeline(str(folder)), str(folder)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_precomputes_curated_clips(curated, tmp_path, name):
    """The shared suite's precompute step: real curated clips through each family's own encoders."""
    from vidtune.training.tiny_models import build_tiny

    output, _, _ = curated
    family = get_family(name)
    folder = build_tiny(name, tmp_path / "model")
    pipe = load_encoders(family, str(folder), torch.float32, "cpu")  # as the finetune flow's precompute loads it
    loaded = [c for c in family.denoiser_components if getattr(pipe, c, None) is not None]
    assert bool(loaded) == family.precompute_reads_denoiser and pipe.vae is not None
    # A denoiser precompute reads the config of holds no weights: it is built on the meta device.
    assert all(p.is_meta for c in loaded for p in getattr(pipe, c).parameters())
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))[:1]
    result = precompute(shards, family, pipe, str(folder), tmp_path / "cache", PrecomputeParams(frame_buckets=[9, 17]))
    assert result.encoded > 0
    sample = next(
        iter(wds.WebDataset(sorted(str(p) for p in result.cache_dir.rglob("cache-*.tar")), shardshuffle=False))
    )
    entry = load_cache_entry(sample)
    cached, text = entry["latents"], entry["text"]
    latents = family.sample_latents(pipe, cached.unsqueeze(0))
    assert (
        cached.shape[0] == (2 if family.caches_posterior else 1) * latents.shape[1]
        and torch.isfinite(latents).all()
        and torch.isfinite(text["embeds"]).all()
    )


def test_choose_bucket_takes_the_longest_that_fits():
    assert choose_bucket(40, [9, 17, 33]) == 33 and choose_bucket(9, [9, 17]) == 9 and choose_bucket(8, [9, 17]) is None


def test_precompute_caches_latents_and_text_then_reuses_them(curated, tiny_wan, tmp_path):
    output, summary, _ = curated
    family, pipe, model = tiny_wan
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    params = PrecomputeParams(frame_buckets=[9, 17, 33])  # test clips are 8 fps, 1-5 s: 8-40 frames
    first = precompute(shards, family, pipe, model, tmp_path / "cache", params)
    assert first.encoded + sum(first.skipped.values()) == summary["clips"]["kept"] and first.encoded > 0
    assert all(reason.startswith("shorter than every bucket") for reason in first.skipped)

    entries = list(wds.WebDataset(sorted(str(p) for p in first.cache_dir.glob("*/cache-*.tar")), shardshuffle=False))
    assert len(entries) == first.encoded
    entry = load_cache_entry(entries[0])
    mean, text = entry["latents"], entry["text"]
    assert entry["condition"] == {}  # a text-to-video family caches no conditioning
    bucket = entries[0]["__url__"].split("/")[-2]
    frames = int(bucket.split("x")[0])
    assert mean.shape[0] == pipe.vae.config.z_dim and mean.shape[1] == (frames - 1) // 4 + 1  # Wan: the mean alone
    assert torch.isfinite(mean).all() and text["embeds"].shape == (512, pipe.text_encoder.config.d_model)

    # Each distinct caption went through the text encoder once; every encoded clip's MP4 was read once.
    cached_ids = {e["__key__"] for e in entries}
    captions = {
        meta["caption"]
        for meta in (json.loads(c["json"]) for c in wds.WebDataset(shards, shardshuffle=False))
        if meta["clip_id"] in cached_ids
    }
    assert first.prompts_encoded == len(captions) < first.encoded and first.videos_read == first.encoded

    again = precompute(shards, family, pipe, model, tmp_path / "cache", params)
    assert (again.encoded, again.reused) == (0, first.encoded)
    assert (again.videos_read, again.prompts_encoded) == (0, 0)  # cached clips: their MP4s are not even read
    assert not list(first.cache_dir.rglob(".*.tmp"))


def _first_clips(shard: str, count: int, path) -> str:
    """A shard of the first `count` clips of `shard`."""
    with tarfile.open(shard) as src, tarfile.open(path, "w") as dst:
        members = src.getmembers()
        keys = sorted({m.name.split(".", 1)[0] for m in members})[:count]
        for member in members:
            if member.name.split(".", 1)[0] in keys:
                dst.addfile(member, src.extractfile(member))
    return str(path)


def test_new_clips_are_added_incrementally(curated, tiny_wan, tmp_path):
    output, _, _ = curated
    family, pipe, model = tiny_wan
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    params = PrecomputeParams(frame_buckets=[9], clips_per_shard=4)
    partial = _first_clips(shards[0], 3, tmp_path / "partial.tar")
    first = precompute([partial], family, pipe, model, tmp_path / "cache", params)
    full = precompute(shards, family, pipe, model, tmp_path / "cache", params)
    assert first.encoded == 3 and full.reused == 3 and full.encoded > 0
    ids = [
        s["__key__"]
        for s in wds.WebDataset(sorted(str(p) for p in full.cache_dir.rglob("cache-*.tar")), shardshuffle=False)
    ]
    assert len(ids) == len(set(ids)) == 3 + full.encoded


def test_two_processes_encode_disjoint_shares_that_add_up_to_one_process_cache(curated, tiny_wan, tmp_path):
    """precompute with num_processes=2: each process encodes its share of the clips not cached yet into its own
    shards; together they cache what one process does, with the same tensors, and count each clip once."""
    from vidtune.training.precompute_launch import precompute_processes

    output, _, _ = curated
    family, pipe, model = tiny_wan
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    params = PrecomputeParams(frame_buckets=[9, 17])
    one = precompute(shards, family, pipe, model, tmp_path / "one", params, prompts=["a red car"])
    precompute([_first_clips(shards[0], 6, tmp_path / "six.tar")], family, pipe, model, tmp_path / "two", params)
    seen = []
    two = precompute_processes(shards, "wan", model, tmp_path / "two", params, ["a red car"], 2, seen.append)
    assert two.cache_dir.name == one.cache_dir.name and two.reused > 0
    assert (two.encoded + two.reused, two.skipped) == (one.encoded, one.skipped)
    assert seen and max(seen) <= one.encoded + sum(one.skipped.values())
    written = {p.name for p in two.cache_dir.rglob("cache-*.tar")}
    assert any(n.endswith("-0.tar") for n in written) and any(n.endswith("-1.tar") for n in written)

    def entries(cache_dir):
        tars = sorted(str(p) for p in cache_dir.rglob("cache-*.tar"))
        return {s["__key__"]: load_cache_entry(s) for s in wds.WebDataset(tars, shardshuffle=False)}

    alone, together = entries(one.cache_dir), entries(two.cache_dir)
    assert sorted(alone) == sorted(together)
    for clip_id, entry in alone.items():
        assert torch.allclose(entry["latents"], together[clip_id]["latents"], atol=1e-5), clip_id
        assert torch.equal(entry["text"]["embeds"], together[clip_id]["text"]["embeds"]), clip_id
    assert {p.name for p in two.prompts_dir.iterdir()} == {p.name for p in one.prompts_dir.iterdir()}


def test_a_failing_precompute_process_stops_the_others_and_says_why(curated, tmp_path):
    from vidtune.training.precompute_launch import precompute_processes

    output, _, _ = curated
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    with pytest.raises(RuntimeError, match=r"precompute process [01] of 2 failed: \w+Error: .*no-model"):
        precompute_processes(shards, "wan", str(tmp_path / "no-model"), tmp_path / "cache", PrecomputeParams(), [], 2)
    assert not list((tmp_path / "cache").glob(".precompute-*"))  # the job and status files are removed


def test_new_weights_in_the_same_folder_get_a_new_fingerprint(tiny_wan, tmp_path):
    family, pipe, model = tiny_wan
    folder = build_tiny_wan(tmp_path / "model", seed=1)
    before = cache_fingerprint(family, family.load_pipeline(str(folder)), str(folder))
    build_tiny_wan(folder, seed=2)  # same configs, other weights
    assert cache_fingerprint(family, family.load_pipeline(str(folder)), str(folder)) != before
    assert before != cache_fingerprint(family, pipe, model)


def test_vae_tiling_encodes_large_clips_in_tiles_and_gives_nearly_the_same_latents(tiny_wan, tmp_path, monkeypatch):
    """A 320x288 clip is past Wan's 256-pixel tile, so tiling really splits it (the curated 64x64 clips never are)."""
    from vidtune.training.media import write_mp4

    family, _, model = tiny_wan
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, 288, 320, 3), dtype=np.uint8), 9, axis=0)
    write_mp4(frames, tmp_path / "large.mp4", fps=8)
    meta = {"clip_id": "large", "num_frames": 9, "height": 288, "width": 320, "caption": "a large clip"}
    with wds.TarWriter(str(tmp_path / "large.tar")) as sink:
        sink.write(
            {"__key__": "large", "mp4": (tmp_path / "large.mp4").read_bytes(), "json": json.dumps(meta).encode()}
        )
    results, tiled_calls = {}, []
    for flags in ((False, False), (True, True)):
        fresh = family.load_pipeline(model)
        tiled = fresh.vae.tiled_encode
        monkeypatch.setattr(
            fresh.vae,
            "tiled_encode",
            lambda x, *a, _flags=flags, _tiled=tiled, **k: tiled_calls.append(_flags) or _tiled(x, *a, **k),
        )
        params = PrecomputeParams(frame_buckets=[9], vae_slicing=flags[0], vae_tiling=flags[1])
        result = precompute([str(tmp_path / "large.tar")], family, fresh, model, tmp_path / str(flags), params)
        sample = next(
            iter(wds.WebDataset(sorted(str(p) for p in result.cache_dir.rglob("cache-*.tar")), shardshuffle=False))
        )
        results[flags] = load_cache_entry(sample)["latents"]
    assert tiled_calls == [(True, True)]  # the tiling leg encoded in tiles, the other in one piece
    whole, tiles = results[(False, False)], results[(True, True)]
    assert whole.shape == tiles.shape
    assert (
        torch.nn.functional.cosine_similarity(whole.flatten(), tiles.flatten(), dim=0) > 0.99
    )  # tiles blend at the seams
