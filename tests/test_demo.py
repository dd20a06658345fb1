"""`vidtune demo` end to end (through the same function the CLI calls): curation, then a LoRA on a tiny Wan."""

from __future__ import annotations

import io

import webdataset as wds
from rich.console import Console

from vidtune.flows.demo import DEMO_STEPS, run_demo


def test_demo_curates_generated_videos_and_fine_tunes_a_lora(prefect_api, tmp_path, monkeypatch):
    # the home run_demo would choose, set here so it is undone afterwards: later tests keep their own
    monkeypatch.setenv("VIDTUNE_HOME", str((tmp_path / "demo").resolve() / "home"))
    out = io.StringIO()
    summary = run_demo(tmp_path / "demo", Console(file=out, width=120))
    curated, trained = summary["curate"], summary["finetune"]
    shards = sorted(str(p) for p in (tmp_path / "demo" / "dataset" / "shards").glob("*.tar"))
    assert curated["clips"]["kept"] == len(list(wds.WebDataset(shards, shardshuffle=False))) > 0
    assert curated["sources"]["failed"] == 2  # the two broken files the demo adds on purpose
    run = tmp_path / "demo" / "runs" / "style-lora"
    assert trained["steps"] == DEMO_STEPS and (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "adapter" / "comfyui_lora.safetensors").is_file() and (
        run / "samples" / f"step-{DEMO_STEPS:06d}" / "sample-00.gif"
    ).is_file()
    text = out.getvalue()
    assert (
        "manifest.parquet" in text
        and "not a video" in text
        and "mlflow ui --backend-store-uri" in text
        and "Prefect UI:" in text
    )
    assert trained["registration"]["promoted"] and "champion" in trained["registration"]["aliases"]
    assert summary["generated"].is_file() and "val_loss" in text

    again = run_demo(tmp_path / "demo", Console(file=io.StringIO(), width=120))  # a rerun resumes, it does not redo
    assert again["finetune"]["steps"] == DEMO_STEPS and again["finetune"]["losses"] == trained["losses"]
    assert not again["finetune"]["registration"]["created"]  # the same run is not registered twice
