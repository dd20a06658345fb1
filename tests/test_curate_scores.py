"""The second half of curation through the real flow: captions, CLIP, motion, text-area and aesthetic scores,
filters, dedup, VLM captions, fail-fast model checks, and Dask scale-out giving the same manifest."""

from __future__ import annotations

import io
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import webdataset as wds

from vidtune.tasks.manifest import read_manifest
from vidtune.tasks.synthetic_videos import render_video


@pytest.fixture(scope="session")
def scored_inputs(tmp_path_factory):
    """Two moving videos (one with a sidecar caption), a static one, and a re-encoded copy of the first."""
    folder = tmp_path_factory.mktemp("scored-raw")
    render_video(folder / "city.mp4", seconds=3, fps=25, shots=1, seed=11)
    (folder / "city.txt").write_text("a purple city with moving shapes\n")
    render_video(folder / "field.mp4", seconds=3, fps=25, shots=1, seed=12)
    render_video(folder / "tripod.mp4", seconds=3, fps=25, shots=1, motion=0, seed=13)
    with av.open(str(folder / "city.mp4")) as src, av.open(str(folder / "zz city copy.mp4"), "w") as dst:
        stream = dst.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = 320, 240, "yuv420p", {"crf": "30"}
        for i, frame in enumerate(src.decode(video=0)):
            frame.pts, frame.time_base = i, Fraction(1, 25)
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode())
    return folder


@pytest.fixture(scope="session")
def scored(prefect_api, scored_inputs, tmp_path_factory, make_params):
    from vidtune.flows.curate import curate

    output = tmp_path_factory.mktemp("scored")
    summary = curate(make_params(scored_inputs, output, captions={"trigger": "in sks style"}))
    return (
        output,
        summary,
        {r.source.rsplit("/", 1)[-1]: r for r in read_manifest(output / "manifest.parquet") if r.clip_id},
    )


def test_captions_come_from_the_sidecar_or_the_template(scored):
    _, _, rows = scored
    assert rows["city.mp4"].caption == "in sks style, a purple city with moving shapes"
    assert rows["field.mp4"].caption == "in sks style, field"


def test_static_clips_are_filtered_with_a_reason_and_counted(scored):
    _, summary, rows = scored
    assert rows["tripod.mp4"].status.value == "filtered" and rows["tripod.mp4"].reason.startswith("static: motion")
    assert rows["field.mp4"].motion_score > 1.0 > rows["tripod.mp4"].motion_score
    assert summary["clip_reasons"]["static"] == 1


def test_shards_carry_the_clip_embedding_and_scores(scored):
    output, _, rows = scored
    samples = list(wds.WebDataset(sorted(str(p) for p in (output / "shards").glob("*.tar")), shardshuffle=False))
    assert {s["__key__"] for s in samples} == {r.clip_id for r in rows.values() if r.status.value == "kept"}
    for sample in samples:
        embedding = np.load(io.BytesIO(sample["npy"]))
        meta = json.loads(sample["json"])
        assert embedding.shape == (32,) and abs(np.linalg.norm(embedding) - 1) < 1e-3
        assert -1 <= meta["clip_score"] <= 1 and meta["motion_score"] > 0 and meta["caption"] == sample["txt"].decode()


def test_score_histograms_are_written(scored):
    output, _, _ = scored
    for name in ("clip_score_hist.png", "motion_score_hist.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_thresholds_refilter_without_reextracting(scored, scored_inputs, make_params, tmp_path):
    import shutil

    from vidtune.flows.curate import curate

    output, _, rows = scored
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    summary = curate(
        make_params(scored_inputs, copy, captions={"trigger": "in sks style"}, filters={"min_motion": None})
    )
    assert summary["sources"]["resumed"] == 4
    keys = {
        s["__key__"]
        for s in wds.WebDataset(sorted(str(p) for p in (copy / "shards").glob("*.tar")), shardshuffle=False)
    }
    assert rows["tripod.mp4"].clip_id in keys  # shards were rebuilt to include the clip now kept

    summary = curate(
        make_params(
            scored_inputs,
            copy,
            captions={"trigger": "in sks style"},
            filters={"min_clip_score": 0.99, "score_only": True},
        )
    )
    assert summary["clips"]["filtered"] == 0


def _shard_keys(output) -> list[str]:
    return [
        s["__key__"]
        for s in wds.WebDataset(sorted(str(p) for p in (output / "shards").glob("*.tar")), shardshuffle=False)
    ]


def _prepare_training(data, model, out) -> dict:
    """The finetune flow up to train_job.json (precompute included), as `prepare_only` runs it."""
    from vidtune.flows.finetune import FinetuneParams, finetune

    values = {"data": str(data), "model": model, "out": str(out), "prepare_only": True, "holdout_clips": 0}
    values |= {"run_evaluation": False, "run_registration": False}
    finetune(FinetuneParams.model_validate(values | {"precompute": {"frame_buckets": [9]}, "validation": {}}))
    return json.loads((out / "train_job.json").read_text())


def _trained(job: dict, batches: int) -> set[str]:
    from vidtune.training.data import make_stream

    stream = make_stream(
        "cache", job["shards"], job["frame_buckets"], batch_size=1, seed=0, clip_ids=set(job["train_clip_ids"])
    )
    return {c for batch, _ in zip(stream, range(batches)) for c in batch["clip_ids"]}


def test_a_tighter_filter_takes_an_already_packed_clip_out_of_the_shards(scored, scored_inputs, make_params, tmp_path):
    """... and out of training: the latent cache still holds it (nothing is re-encoded), but no new run trains it."""
    import shutil

    from vidtune.flows.curate import curate
    from vidtune.training.tiny_models import build_tiny_wan

    output, _, _ = scored
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    model = str(build_tiny_wan(tmp_path / "wan"))
    before = _prepare_training(copy, model, tmp_path / "run-before")
    cached = {p: p.stat().st_mtime_ns for p in (copy / "latent_cache").rglob("cache-*.tar")}
    kept = sorted(
        (r for r in read_manifest(copy / "manifest.parquet") if r.status.value == "kept"), key=lambda r: r.motion_score
    )
    assert len(kept) >= 2 and sorted(_shard_keys(copy)) == sorted(r.clip_id for r in kept)  # all packed already
    dropped, survivors = kept[0], kept[1:]
    assert dropped.motion_score < survivors[0].motion_score
    stricter = (dropped.motion_score + survivors[0].motion_score) / 2  # drops exactly the least moving clip
    summary = curate(
        make_params(scored_inputs, copy, captions={"trigger": "in sks style"}, filters={"min_motion": stricter})
    )
    assert summary["sources"]["resumed"] == 4  # a threshold change re-filters the staged rows, nothing re-extracted
    rows = {r.clip_id: r for r in read_manifest(copy / "manifest.parquet") if r.clip_id}
    assert rows[dropped.clip_id].status.value == "filtered" and rows[dropped.clip_id].reason.startswith(
        "static: motion"
    )
    assert rows[dropped.clip_id].shard is None
    keys = _shard_keys(copy)
    assert sorted(keys) == sorted(r.clip_id for r in survivors)  # the dropped one gone, each kept one exactly once
    for clip_id in keys:
        assert (copy / "shards" / rows[clip_id].shard).is_file()
    assert not [p.name for p in (copy / "shards").iterdir() if not p.name.endswith(".tar")]  # no temporary files

    after = _prepare_training(copy, model, tmp_path / "run-after")
    assert {p: p.stat().st_mtime_ns for p in (copy / "latent_cache").rglob("cache-*.tar")} == cached  # not re-encoded
    assert dropped.clip_id in before["train_clip_ids"] and dropped.clip_id in _trained(before, 20)  # still cached
    assert sorted(after["train_clip_ids"]) == sorted(r.clip_id for r in survivors)
    assert _trained(after, 20) == set(after["train_clip_ids"])


def test_overwrite_replaces_an_output_made_with_other_settings(scored, scored_inputs, make_params, tmp_path):
    import shutil

    from vidtune.flows.curate import curate

    output, _, before = scored
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    old_ids = {r.clip_id for r in before.values()}
    # 48 pixels wide: a width decord cannot copy out (its padded rows); scoring reads such clips with PyAV
    new = dict(captions={"trigger": "new"}, scenes={"max_clip_s": 1.0}, clips={"width": 48, "height": 32})
    summary = curate(make_params(scored_inputs, copy, overwrite=True, **new))
    assert summary["sources"]["resumed"] == 0  # nothing staged under the old settings is reused
    rows = [r for r in read_manifest(copy / "manifest.parquet") if r.clip_id]
    kept = {r.clip_id for r in rows if r.status.value == "kept"}
    assert kept and not old_ids & {r.clip_id for r in rows}  # 1 s clips: none of the 3 s clips is left
    assert all(r.caption.startswith("new, ") and r.end_s - r.start_s <= 1.0 + 1e-6 for r in rows)
    samples = list(wds.WebDataset(sorted(str(p) for p in (copy / "shards").glob("*.tar")), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(kept)
    for sample in samples:
        with av.open(io.BytesIO(sample["mp4"])) as container:
            assert (container.streams.video[0].width, container.streams.video[0].height) == (48, 32)
        assert json.loads(sample["json"])["motion_score"] > 0
    staged = {p.stem for p in (copy / ".vidtune" / "staging").rglob("*.mp4")}
    assert staged == {r.clip_id for r in rows}  # no clip of the old run is left in staging either


def test_a_full_disk_while_packing_stops_clearly_and_a_rerun_completes(
    scored, scored_inputs, make_params, tmp_path, monkeypatch
):
    import errno
    import shutil

    from vidtune.flows.curate import curate

    output, _, rows = scored
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    shutil.rmtree(copy / "shards")  # everything staged, nothing packed yet
    kept = sorted(r.clip_id for r in rows.values() if r.status.value == "kept")
    real_write, writes = wds.TarWriter.write, []

    def write_until_full(self, sample):
        writes.append(sample["__key__"])
        if len(writes) == 2:  # the disk fills while the second shard is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, sample)

    params = make_params(scored_inputs, copy, captions={"trigger": "in sks style"}, shards={"max_clips_per_shard": 1})
    monkeypatch.setattr(wds.TarWriter, "write", write_until_full)
    with pytest.raises(
        OSError,
        match=rf"no space left on the device of {copy}/shards with {len(kept) - 1} kept clips still to pack .*run the same command again",
    ):
        curate(params)
    assert _shard_keys(copy) == kept[:1] and sorted(p.name for p in (copy / "shards").iterdir()) == ["shard-000000.tar"]
    monkeypatch.setattr(wds.TarWriter, "write", real_write)  # space freed
    curate(params)
    keys = _shard_keys(copy)
    assert sorted(keys) == kept and len(keys) == len(set(keys))  # every kept clip exactly once
    manifest = {r.clip_id: r.shard for r in read_manifest(copy / "manifest.parquet") if r.status.value == "kept"}
    assert all((copy / "shards" / shard).is_file() for shard in manifest.values()) and sorted(manifest) == kept


def test_near_duplicates_are_removed_naming_the_kept_clip(prefect_api, scored_inputs, make_params, tmp_path):
    from vidtune.flows.curate import curate

    curate(
        make_params(
            scored_inputs,
            tmp_path / "d",
            captions={"trigger": "sks"},
            filters={"dedup_threshold": 0.9995, "min_motion": None},
        )
    )
    rows = {r.source.rsplit("/", 1)[-1]: r for r in read_manifest(tmp_path / "d" / "manifest.parquet") if r.clip_id}
    assert rows["zz city copy.mp4"].reason == f"duplicate_of:{rows['city.mp4'].clip_id}"
    assert [name for name, r in rows.items() if r.status.value != "kept"] == ["zz city copy.mp4"]


def test_vlm_captions_through_the_flow(prefect_api, scored_inputs, make_params, tmp_path):
    from vidtune.flows.curate import curate
    from vidtune.training.tiny_models import CAPTION_WORDS, build_tiny_captioner

    blip = build_tiny_captioner(tmp_path / "blip")
    params = make_params(
        scored_inputs, tmp_path / "v", captions={"mode": "vlm", "vlm_model": str(blip), "trigger": "sks"}
    )
    curate(params)
    for row in read_manifest(tmp_path / "v" / "manifest.parquet"):
        trigger, _, words = row.caption.partition(", ")
        assert trigger == "sks" and words and set(words.split()) <= set(CAPTION_WORDS)


def test_text_area_and_aesthetic_scores_reach_the_manifest_and_plots(prefect_api, scored_inputs, make_params, tmp_path):
    import torch

    from vidtune.flows.curate import curate
    from vidtune.tasks.annotate import embedding_path
    from vidtune.tasks.records import Status

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1)  # LAION's linear head shape, for the tiny CLIP's 32-dim embedding
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scores = {"text_area": True, "aesthetic_head": str(tmp_path / "head.pth")}
    curate(make_params(scored_inputs, tmp_path / "o", captions={"trigger": "sks"}, scores=scores))
    rows = [r for r in read_manifest(tmp_path / "o" / "manifest.parquet") if r.clip_id]
    assert len(rows) == 4 and all(r.status != Status.FAILED and r.text_area is not None for r in rows)
    for row in rows:
        embedding = np.load(embedding_path(tmp_path / "o" / ".vidtune" / "staging" / row.source_sha256, row.clip_id))
        expected = head(torch.nn.functional.normalize(torch.from_numpy(embedding).float(), dim=0)).item()
        assert row.aesthetic_score == pytest.approx(expected, abs=1e-4)
    for name in ("text_area_hist.png", "aesthetic_score_hist.png"):
        assert (tmp_path / "o" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"scores": {"clip_pretrained": "/nowhere/weights.safetensors"}}, "scores.clip_pretrained"),
        ({"captions": {"mode": "vlm", "vlm_model": "./no/such/model"}}, "captions.vlm_model"),
        ({"captions": {"sidecar_file": "/nowhere/captions.csv"}}, "captions.sidecar_file"),
        ({"scores": {"aesthetic_head": "/nowhere/head.pth"}}, "scores.aesthetic_head"),
    ],
)
def test_missing_models_fail_before_any_video_is_decoded(
    prefect_api, scored_inputs, make_params, tmp_path, overrides, field
):
    from vidtune.flows.curate import curate
    from vidtune.tasks.preflight import ModelSetupError

    with pytest.raises(ModelSetupError, match=field.replace(".", r"\.")):
        curate(make_params(scored_inputs, tmp_path / "never", **overrides))
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_a_local_cluster_gives_the_same_manifest(scored, scored_inputs, make_params, tmp_path, runner):
    """Two worker processes (Dask LocalCluster / local Ray) produce what the threaded run produced."""
    from vidtune.flows.curate import curate

    pytest.importorskip("prefect_ray" if runner == "ray" else "prefect_dask")
    output, _, _ = scored
    curate(
        make_params(scored_inputs, tmp_path / runner, captions={"trigger": "in sks style"}, runner=runner, workers=2)
    )
    threads = sorted(read_manifest(output / "manifest.parquet"), key=lambda r: (r.source, r.start_frame))
    dask = sorted(read_manifest(tmp_path / runner / "manifest.parquet"), key=lambda r: (r.source, r.start_frame))
    assert len(threads) == len(dask)
    for a, b in zip(threads, dask):
        kind = lambda r: r.reason.split(":", 1)[0]  # noqa: E731  (reasons quote scores to 2 decimals)
        assert (a.source.rsplit("/", 1)[-1], a.clip_id, a.status, kind(a), a.caption) == (
            b.source.rsplit("/", 1)[-1],
            b.clip_id,
            b.status,
            kind(b),
            b.caption,
        )
        # Cluster workers run torch with one thread, the threaded run with two: summation order differs slightly.
        for score in ("clip_score", "motion_score"):
            assert getattr(a, score) == pytest.approx(getattr(b, score), abs=1e-3)
