"""The CLI as users type it, each command a subprocess with its exit code and output checked: `vidtune finetune
--raw` (curate, train, evaluate, register in one), `vidtune evaluate RUN`, `vidtune register RUN --set name=…` and
`vidtune generate --model models:/NAME@champion` (default size and frames, --cpu-offload, --vae-tiling, the
downloaded model reused). They go through the warm worker, as they do for users."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import av
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TEST_CLIPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli(prefect_api, tmp_path_factory):
    """Run `vidtune ARGS` in a user's shell: the session's Prefect server, a VIDTUNE_HOME of its own, the worker on."""
    root = tmp_path_factory.mktemp("cli")
    env = os.environ | {
        "PREFECT_API_URL": prefect_api,
        "VIDTUNE_HOME": str(root / "home"),
        "VIDTUNE_WORKER": "1",
        "COLUMNS": "200",
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vidtune.flows.cli", *map(str, args)],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )

    run.root = root
    yield run
    stopped = run("server", "stop")
    assert (
        stopped.returncode == 0 and "stopped 1 warm worker(s)" in stopped.stdout
    )  # one worker served the whole module


@pytest.fixture(scope="module")
def trained(cli, raw_videos, tiny_clip):
    """`vidtune finetune --raw` on a few raw videos with a tiny Wan, registered as cli-style."""
    from vidtune.training.tiny_models import TINY_CLIP, build_tiny_wan

    raw = cli.root / "raw"
    raw.mkdir()
    for video in raw_videos[1][:3]:
        shutil.copy(video.path, raw)
    model = build_tiny_wan(cli.root / "wan")
    sets = {
        **{f"curate.clips.{k}": v for k, v in TEST_CLIPS.items()},
        "curate.scores.clip_model": TINY_CLIP,
        "curate.scores.clip_pretrained": tiny_clip,
        "curate.filters.dedup_threshold": "null",
        "precompute.frame_buckets": "[9]",
        "rank": 8,
        "learning_rate": 2e-3,
        "max_steps": 24,
        "checkpoint_every": 100,
        "mixed_precision": "no",
        "holdout_clips": 2,
        "validation.every": 100,
        "evaluation.inference_steps": 2,
        "evaluation.prompts": "[a red car]",
        "evaluation.clip_model": TINY_CLIP,
        "evaluation.clip_pretrained": tiny_clip,
        "registry.name": "cli-style",
    }
    result = cli(
        "finetune",
        "--raw",
        raw,
        "--data",
        "dataset",
        "--model",
        model,
        "--out",
        "run",
        *(f"--set={k}={v}" for k, v in sets.items()),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, cli.root / "run", f"sqlite:///{cli.root / 'home' / 'mlflow.db'}"  # the default MLflow


def test_finetune_raw_curates_trains_evaluates_and_registers(trained, cli):
    result, run, tracking_uri = trained
    out = " ".join(result.stdout.split())  # rich renders the markdown tables as aligned columns
    assert "curate →" in out and "finetune (wan) →" in out and "steps 24 loss" in out, result.stdout
    assert "Registered models:/cli-style/1 [" in out and "champion" in out, result.stdout
    assert (cli.root / "dataset" / "manifest.parquet").is_file() and (
        run / "adapter" / "pytorch_lora_weights.safetensors"
    ).is_file()
    assert str(MlflowClient(tracking_uri).get_model_version_by_alias("cli-style", "champion").version) == "1"


def test_evaluate_and_register_a_run(trained, cli, tiny_clip):
    from vidtune.training.tiny_models import TINY_CLIP

    _, run, tracking_uri = trained
    (run / "evaluation" / "metrics.json").unlink()
    evaluated = cli(
        "evaluate",
        run,
        "--set=inference_steps=2",
        f"--set=clip_model={TINY_CLIP}",
        f"--set=clip_pretrained={tiny_clip}",
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert (
        (run / "evaluation" / "metrics.json").is_file() and "base" in evaluated.stdout and "adapted" in evaluated.stdout
    )

    registered = cli("register", run, "--set=name=cli-other")  # its MLflow: the one the run trained against
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert registered.stdout.startswith("models:/cli-other/1 [") and "champion" in registered.stdout
    assert MlflowClient(tracking_uri).get_registered_model("cli-other").name == "cli-other"

    refused = cli("register", run, "--set=nme=x")
    assert refused.returncode == 2 and "nme" in refused.stdout


def test_generate_from_the_champion_at_the_training_size_and_reuses_the_download(trained, cli):
    first = cli(
        "generate", "--model", "models:/cli-style@champion", "--prompt", "a red car", "--out", "a.mp4", "--steps", "2"
    )
    cached = sorted((cli.root / "home" / "models").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = cli(
        "generate",
        "--model",
        "models:/cli-style@champion",
        "--prompt",
        "a red car",
        "--out",
        "b.gif",
        "--steps",
        "2",
        "--cpu-offload",
        "--vae-tiling",
        "--frames",
        "5",
    )
    missing = cli("generate", "--model", "models:/nope@champion", "--prompt", "x", "--out", "c.mp4")
    assert first.returncode == 0 and second.returncode == 0, first.stdout + first.stderr + second.stdout + second.stderr
    with av.open(str(cli.root / "a.mp4")) as video:
        stream = video.streams.video[0]
        frames = sum(1 for _ in video.decode(stream))
        assert (frames, stream.height, stream.width) == (
            9,
            TEST_CLIPS["height"],
            TEST_CLIPS["width"],
        )  # the trained bucket and size
    assert (cli.root / "b.gif").is_file() and "wrote" in second.stdout
    assert (
        sorted((cli.root / "home" / "models").iterdir()) == cached and [p.stat().st_mtime_ns for p in cached] == stamps
    )
    assert missing.returncode == 2 and "does not exist" in missing.stdout


def test_generate_refuses_a_conditioning_image_for_a_text_to_video_model(trained, cli):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(cli.root / "first.png")
    refused = cli(
        "generate", "--model", "models:/cli-style@champion", "--prompt", "a red car", "--out", "i.mp4",
        "--image", cli.root / "first.png",
    )  # fmt: skip
    out = " ".join(refused.stdout.split())
    assert refused.returncode == 2 and "image: Wan 2.1 / 2.2 (wan) generates from text only" in out, refused.stdout
    assert "ltx-video-i2v" in out and not (cli.root / "i.mp4").exists()
