"""`vidtune demo` end to end (through the same function the CLI calls)."""

from __future__ import annotations

import io

import webdataset as wds
from rich.console import Console

from flows.demo import run_demo


def test_demo_curates_generated_videos_and_reports_bad_inputs(prefect_api, tmp_path):
    out = io.StringIO()
    summary = run_demo(tmp_path / "demo", Console(file=out, width=120))
    shards = sorted(str(p) for p in (tmp_path / "demo" / "dataset" / "shards").glob("*.tar"))
    assert summary["clips"]["kept"] == len(list(wds.WebDataset(shards, shardshuffle=False))) > 0
    assert summary["sources"]["failed"] == 2  # the two broken files the demo adds on purpose
    text = out.getvalue()
    assert "manifest.parquet" in text and "not a video" in text
