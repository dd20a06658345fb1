"""Resume after a real SIGKILL: same clip ids as an uninterrupted run, no duplicates, no partial shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from vidtune.tasks.manifest import read_manifest


def _curate_cmd(input_dir: Path, output: Path, sets: list[str]) -> list[str]:
    cli = [sys.executable, "-c", "from vidtune.flows.cli import app; app()"]
    return [*cli, "curate", str(input_dir), str(output), *sets, "--set=workers=1"]


def _env(prefect_api: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "COLUMNS": "200"}  # share the session's Prefect server


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(
    prefect_api, raw_videos, tmp_path, cli_sets, make_params
):
    from vidtune.flows.curate import curate

    folder, videos = raw_videos
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    curate(make_params(folder, reference, workers=1))  # the same settings as cli_sets, in this process

    proc = subprocess.Popen(
        _curate_cmd(folder, resumed, cli_sets),
        env=_env(prefect_api),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = resumed / ".vidtune" / "staging"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(staging.glob("*/rows.json"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: no cleanup code gets to run
    proc.wait()
    done_before_kill = len(list(staging.glob("*/rows.json")))
    assert 2 <= done_before_kill < len(videos), "the kill should land mid-run"
    assert not (resumed / "manifest.parquet").exists()
    for shard in (resumed / "shards").glob("*.tar"):  # whatever is visible is complete
        list(wds.WebDataset(str(shard), shardshuffle=False))

    rerun = subprocess.run(
        _curate_cmd(folder, resumed, cli_sets), env=_env(prefect_api), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"skipped {done_before_kill} sources already curated" in rerun.stdout + rerun.stderr

    ref_rows, new_rows = read_manifest(reference / "manifest.parquet"), read_manifest(resumed / "manifest.parquet")
    assert sorted(r.clip_id for r in new_rows if r.clip_id) == sorted(r.clip_id for r in ref_rows if r.clip_id)
    shards = sorted(str(p) for p in (resumed / "shards").glob("*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == sum(r.status.value == "kept" for r in ref_rows)
    assert not [p for p in resumed.rglob("*") if p.name.endswith(".tmp")]
