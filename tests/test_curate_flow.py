"""The curate flow on real generated videos and every kind of bad input, through the real Prefect engine."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import decord
import pytest
import webdataset as wds

from tests.conftest import TEST_CLIPS, video_files
from vidtune.tasks.manifest import read_manifest


@pytest.fixture(scope="session")
def manifest(curated):
    output, _, _ = curated
    return read_manifest(output / "manifest.parquet")


def _rows_for(manifest, path: Path):
    return [r for r in manifest if r.source == str(path)]


def test_every_input_appears_in_the_manifest(curated, manifest):
    _, _, (folder, _, _) = curated
    assert {r.source for r in manifest} == {str(p) for p in video_files(folder)}


def test_every_row_not_kept_has_a_reason(manifest):
    for row in manifest:
        assert (row.status.value == "kept") == (row.reason == ""), row


@pytest.mark.parametrize(
    "name",
    [
        "empty.mp4",
        "readme.mp4",
        "truncated.mp4",
        "audio_only.mp4",
        "too_short.mp4",
        "one_frame.mp4",
        "corrupt_middle.mp4",
        "locked.mp4",
        "with spaces and (parens).mp4",
        "vidéo_ñ_日本語.mp4",
        "it's $(echo pwned) `x` ; & |.mp4",
        "copy of a good video.mp4",
        "zero_timestamps.mp4",
        "link loop.mp4",
        "dangling link.mp4",
        "camera 4k hevc 10bit.mp4",
        "edit 4k prores.mov",
        "odd size 161x121.mp4",
        "zero size header.mp4",
    ],
)
def test_bad_input_becomes_a_record(curated, manifest, name, as_root):
    _, _, (folder, _, expected) = curated
    want = expected[name]
    rows = _rows_for(manifest, folder / "zz_bad_inputs" / name)
    assert rows, f"{name} is missing from the manifest"
    if as_root and not want.root_can_read:
        pytest.skip("root reads files regardless of permissions (see test_discover for the permission path)")
    statuses = {r.status.value for r in rows}
    assert want.status in statuses, rows
    if want.reason:
        assert any(want.reason in r.reason for r in rows if r.status.value == want.status), rows


def test_corrupt_source_keeps_its_intact_clips(curated, manifest):
    _, _, (folder, _, _) = curated
    rows = _rows_for(manifest, folder / "zz_bad_inputs" / "corrupt_middle.mp4")
    assert [r for r in rows if r.status.value == "kept"], "clips before and after the corruption should be kept"


def test_good_sources_all_produce_clips(curated, manifest):
    _, summary, (folder, videos, _) = curated
    for video in videos:
        kept = [r for r in _rows_for(manifest, folder / video.path.name) if r.status.value == "kept"]
        assert kept, f"{video.path.name} produced no clips"
    assert summary["clips"]["kept"] == sum(r.status.value == "kept" for r in manifest)


def test_no_clip_crosses_a_scene_boundary(curated, manifest):
    _, _, (folder, videos, _) = curated
    for video in videos:
        boundaries = [(c - 1, c) for c in video.cuts] + video.transitions  # a cut lies between c-1 and c
        for row in _rows_for(manifest, folder / video.path.name):
            for first, last in boundaries:
                overlaps = row.start_frame <= last and first < row.end_frame
                assert not overlaps, (
                    f"{video.path.name} clip [{row.start_frame},{row.end_frame}) crosses {first}-{last}"
                )


def test_clip_ids_are_unique_and_deterministic(manifest):
    from vidtune.tasks.records import clip_id_for

    clip_rows = [r for r in manifest if r.clip_id]
    assert len({r.clip_id for r in clip_rows}) == len(clip_rows)
    for row in clip_rows:
        assert row.clip_id == clip_id_for(row.source_sha256, row.start_frame, row.end_frame)


def test_shards_read_back_and_every_clip_decodes(curated, manifest):
    output, _, _ = curated
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    assert shards and not list((output / "shards").glob(".*"))  # no temporary files left behind
    kept = {r.clip_id: r for r in manifest if r.status.value == "kept"}
    seen = set()
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        row = kept[sample["__key__"]]
        assert meta["clip_id"] == row.clip_id and Path(sample["__url__"]).name == row.shard == meta["shard"]
        assert sample["txt"].decode() == row.caption
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        assert len(reader) == row.num_frames
        assert reader[0].shape == (TEST_CLIPS["height"], TEST_CLIPS["width"], 3)
        seen.add(row.clip_id)
    assert seen == set(kept)


def test_clip_length_and_rate_follow_the_parameters(manifest):
    for row in (r for r in manifest if r.status.value == "kept"):
        assert row.fps == TEST_CLIPS["fps"]
        assert 1.0 - 1e-6 <= row.end_s - row.start_s <= 5.0 + 1 / 24
        assert row.num_frames == pytest.approx((row.end_s - row.start_s) * row.fps, abs=1.01)


def test_stats_json_matches_the_manifest(curated, manifest):
    output, summary, _ = curated
    stats = json.loads((output / "stats.json").read_text())
    assert stats["clips"]["kept"] == sum(r.status.value == "kept" for r in manifest)
    assert stats["sources"]["total"] == len({r.source for r in manifest})
    assert 0 < stats["hours_out"] < stats["hours_in"]
    assert stats == {k: v for k, v in summary.items() if k in stats}


def test_rerun_skips_finished_sources_and_changes_nothing(curated, manifest, make_params):
    from vidtune.flows.curate import curate

    output, _, (folder, _, _) = curated
    shards_before = {p.name: p.stat().st_size for p in (output / "shards").glob("*.tar")}
    summary = curate(make_params(folder, output))
    assert summary["sources"]["resumed"] > 0
    assert {p.name: p.stat().st_size for p in (output / "shards").glob("*.tar")} == shards_before
    again = read_manifest(output / "manifest.parquet")
    assert [r.to_dict() for r in again] == [r.to_dict() for r in manifest]


@pytest.mark.parametrize(
    "group, change, named",
    [
        ("scenes", {"threshold": 30.0}, "scenes.threshold"),
        ("clips", {"fps": 12}, "clips.fps"),
        ("captions", {"trigger": "in xyz style"}, "captions.trigger"),
        ("scores", "other weights", "scores.clip_pretrained"),
    ],
)
def test_other_settings_on_the_same_output_are_refused_naming_them(
    curated, make_params, tiny_clip, tmp_path, group, change, named
):
    import shutil

    from vidtune.flows.curate import curate
    from vidtune.tasks.output import OutputMismatchError

    output, _, (folder, _, _) = curated
    if change == "other weights":  # the same model from another file: the scores would differ
        change = {"clip_pretrained": str(shutil.copy(tiny_clip, tmp_path / "other-clip.safetensors"))}
    settings = (output / ".vidtune" / "clip_settings.json").read_bytes()
    manifest = (output / "manifest.parquet").read_bytes()
    with pytest.raises(OutputMismatchError, match=rf"\({re.escape(named)}\);.*overwrite=true"):
        curate(make_params(folder, output, **{group: change}))
    assert (output / ".vidtune" / "clip_settings.json").read_bytes() == settings  # the refusal changed nothing
    assert (output / "manifest.parquet").read_bytes() == manifest


def test_strict_exits_nonzero_only_when_something_failed(prefect_api, raw_videos, tmp_path, cli_sets, vidtune):
    _, videos = raw_videos
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.mp4").write_bytes(videos[0].path.read_bytes())
    curate = ("curate", str(folder), str(tmp_path / "out"), *cli_sets)

    assert vidtune(*curate, "--strict")[0] == 0
    (folder / "broken.mp4").write_text("not a video")
    code, out = vidtune(*curate)  # resumes: only the new source is new work
    assert code == 0 and "not a video" in out, out
    assert vidtune(*curate, "--strict")[0] == 1  # the failure recorded before counts too


def test_an_unreadable_source_is_a_record_at_flow_level(prefect_api, raw_videos, tiny_clip, make_params, as_root):
    """The whole curate flow, run as an unprivileged user when the suite runs as root (root reads any file), with
    folders that user may use; the unreadable source is a record and the readable one is curated."""
    import os
    import tempfile
    from contextlib import nullcontext

    from tests.test_discover import _as_nobody
    from vidtune.flows.curate import curate

    _, videos = raw_videos
    root = Path(tempfile.mkdtemp(prefix="vidtune-user-"))  # outside pytest's root-only (0700) tmp folders
    try:
        (root / "in").mkdir()
        (root / "out").mkdir()
        shutil.copy(videos[0].path, root / "in" / "good.mp4")
        shutil.copy(videos[1].path, root / "in" / "locked.mp4")
        os.chmod(root / "in" / "locked.mp4", 0)
        weights = shutil.copy(tiny_clip, root / "clip.safetensors")
        if as_root:
            for path, mode in ((root, 0o755), (root / "in", 0o755), (weights, 0o644)):
                os.chmod(path, mode)
            os.chown(root / "out", 65534, 65534)
        with _as_nobody() if as_root else nullcontext():
            summary = curate(make_params(root / "in", root / "out", scores={"clip_pretrained": str(weights)}))
        rows = read_manifest(root / "out" / "manifest.parquet")
        locked = [r for r in rows if r.source.endswith("locked.mp4")]
        assert [(r.status.value, r.reason) for r in locked] == [
            ("failed", "permission denied: the file is not readable by this user")
        ]
        assert summary["clips"]["kept"] > 0 and all(
            r.status.value == "kept" for r in rows if r.source.endswith("good.mp4")
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_remote_input_url(prefect_api, raw_videos, tmp_path, make_params):
    import fsspec

    from vidtune.flows.curate import curate

    _, videos = raw_videos
    fs = fsspec.filesystem("memory")
    for video in videos[:2]:
        fs.pipe(f"/vidtune-test/raw/{video.path.name}", video.path.read_bytes())
    summary = curate(make_params("memory://vidtune-test/raw", tmp_path / "out"))
    rows = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert {r.source for r in rows} == {f"memory:///vidtune-test/raw/{v.path.name}" for v in videos[:2]}
    assert summary["clips"]["kept"] > 0 and all(r.status.value == "kept" for r in rows)


def test_the_messy_set_has_no_bars_to_crop_and_the_manifest_says_so(manifest):
    """Night scenes, GIFs, rotated, odd-sized and 4K 10-bit sources have no bars: every kept clip's picture is the
    whole (upright) source frame, recorded in the manifest's crop columns."""
    from vidtune.tasks.probe import probe_video

    kept = [r for r in manifest if r.status.value == "kept"]
    assert kept
    for row in kept:
        expected = (0, 0, *probe_video(row.source).display_size)
        assert (row.crop_left, row.crop_top, row.active_width, row.active_height) == expected, row.source


def test_outputs_are_readable_as_the_umask_allows(curated):
    """Atomic writes go through private temporary files (mkstemp: 0600); what lands must have ordinary modes, or a
    dataset curated on a shared machine is unreadable by the training job of another user."""
    import stat

    from vidtune.training.files import UMASK

    output, _, _ = curated
    files = [output / name for name in ("manifest.parquet", "stats.json", "report.html")]
    files += sorted((output / "shards").glob("*.tar"))
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~UMASK for p in files}


def test_an_output_made_before_a_setting_existed_resumes_when_the_setting_keeps_its_default(tmp_path):
    """Settings saved by an older vidtune lack the newer keys: those count as their defaults (what it did then), so
    an upgrade does not force `overwrite=true`; a non-default value for the new key is still a change."""
    import json

    from vidtune.flows.curate import CurateParams
    from vidtune.tasks.output import OutputLayout, OutputMismatchError, prepare_output

    params = CurateParams(input="in", output=str(tmp_path))
    older = params.clip_settings()
    del older["scores"]["text_area"], older["clips"]["images"]
    layout = OutputLayout(tmp_path)
    layout.settings_file.parent.mkdir(parents=True)
    layout.settings_file.write_text(json.dumps(older))
    defaults = CurateParams.default_clip_settings()
    prepare_output(tmp_path, params.clip_settings(), False, defaults)  # resumes
    layout.settings_file.write_text(json.dumps(older))
    changed = params.model_copy(update={"scores": params.scores.model_copy(update={"text_area": True})})
    with pytest.raises(OutputMismatchError, match=r"\(scores\.text_area\)"):
        prepare_output(tmp_path, changed.clip_settings(), False, defaults)
