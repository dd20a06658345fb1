"""`vidtune demo`: the whole pipeline on generated videos, on one machine, with nothing to download."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
from PIL import Image
from rich.console import Console

from vidtune.evaluation.inference import generate
from vidtune.evaluation.report import print_curate_summary, print_finetune_summary
from vidtune.flows.curate import CurateParams
from vidtune.flows.evaluate import EvaluationParams, RegistryParams
from vidtune.flows.finetune import FinetuneParams, finetune
from vidtune.tasks.captions import CaptionParams, prompt_with_trigger
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.filters import FilterParams
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.synthetic_videos import make_raw_video_set, render_video
from vidtune.training.cache import PrecomputeParams
from vidtune.training.layout import RunLayout
from vidtune.training.params import ValidationParams
from vidtune.training.tiny_models import TINY_CLIP, build_tiny_clip, build_tiny_wan

# Small clips keep the CPU demo quick; real runs use the defaults (832x480, 480x832, 624x624 @ 16 fps for Wan 2.1).
# Three aspect-ratio buckets as there: 128x96, 96x128 (the phone and rotated sources) and 112x112.
DEMO_CLIPS = ClipParams(width=128, height=96, fps=8)
DEMO_SCENES = SceneParams(min_clip_s=1.0, max_clip_s=3.0)
DEMO_CAPTIONS = CaptionParams(trigger="in vidtune-demo style")  # template: "{trigger}, {source_name}"
DEMO_STEPS = 40
DEMO_MODEL = "vidtune-demo"
DEMO_PROMPTS = ["a red car {trigger}", "a city street {trigger}"]  # {trigger}: the dataset's trigger words


def make_demo_inputs(raw: Path) -> None:
    """Synthetic raw videos, a static shot (the motion filter drops it), two photos (single-frame clips) and two
    broken files (they become manifest rows with a reason, not a crash)."""
    if not any(raw.glob("*.mp4")):
        make_raw_video_set(raw, seconds=6.0)
        render_video(raw / "tripod_static.mp4", seconds=3, fps=25, shots=1, motion=0, seed=99)
    photos = raw / "photos"
    if not photos.is_dir():
        photos.mkdir()
        with av.open(str(raw / "street 24fps.mp4")) as video:
            frame = next(video.decode(video=0)).to_ndarray(format="rgb24")
        Image.fromarray(frame).save(photos / "street.jpg", quality=92)
        Image.fromarray(np.rot90(frame).copy()).save(photos / "street_portrait.png")
    (raw / "broken").mkdir(parents=True, exist_ok=True)
    (raw / "broken" / "notes.mp4").write_text("this is a text file with a video extension\n")
    (raw / "broken" / "empty.mov").write_bytes(b"")


def run_demo(workdir: Path, console: Console) -> dict:
    workdir = workdir.resolve()
    os.environ.setdefault("VIDTUNE_HOME", str(workdir / "home"))  # downloads cache and locks stay in the demo folder
    raw, dataset = workdir / "raw", workdir / "dataset"
    console.rule("[bold]1. raw videos")
    make_demo_inputs(raw)
    console.print(f"{len(list(raw.rglob('*.*')))} files in {raw}", highlight=False)

    clip_weights = workdir / "models" / "tiny-clip.safetensors"
    if not clip_weights.exists():
        build_tiny_clip(clip_weights)  # a random open_clip model: the demo needs no download
    model = workdir / "models" / "tiny-wan"
    if not (model / "model_index.json").is_file():
        build_tiny_wan(model)  # a random Wan 2.1 of the real classes, loaded with from_pretrained like a real one
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
    console.rule("[bold]2. one finetune flow run: curate (subflow) -> latents -> LoRA -> evaluate -> register")
    trained = finetune(
        FinetuneParams(
            curate=CurateParams(
                input=str(raw),
                output=str(dataset),
                clips=DEMO_CLIPS,
                scenes=DEMO_SCENES,
                captions=DEMO_CAPTIONS,
                scores=ScoreParams(clip_model=TINY_CLIP, clip_pretrained=str(clip_weights)),
                filters=FilterParams(min_motion=0.5),
            ),
            model=str(model),
            out=str(workdir / "runs" / "style-lora"),
            rank=8,
            learning_rate=2e-3,
            max_steps=DEMO_STEPS,
            checkpoint_every=20,
            resume="latest",
            mixed_precision="no",
            tracking_uri=tracking_uri,
            precompute=PrecomputeParams(frame_buckets=[9, 17]),
            export_comfyui=True,
            validation=ValidationParams(prompts=[DEMO_PROMPTS[0]], every=20, inference_steps=4, fps=8),
            evaluation=EvaluationParams(
                prompts=DEMO_PROMPTS, inference_steps=4, clip_model=TINY_CLIP, clip_pretrained=str(clip_weights)
            ),
            registry=RegistryParams(name=DEMO_MODEL),
        )
    )
    console.rule("[bold]what the curate subflow did")
    print_curate_summary(trained["curate"], console)
    console.rule("[bold]what training, evaluation and registration did")
    print_finetune_summary(trained, console)

    # The gate promotes only on a confident gain; a demo whose tiny LoRA did not earn it shows the challenger.
    alias = "champion" if "champion" in (trained.get("registration") or {}).get("aliases", []) else "challenger"
    if alias == "challenger":
        console.print(
            "the gate kept this version a challenger (see the promotion gate above); generating from it instead",
            highlight=False,
        )
    console.rule(f"[bold]3. generate from models:/{DEMO_MODEL}@{alias}")
    prompt = prompt_with_trigger(DEMO_PROMPTS[0], DEMO_CAPTIONS.trigger)
    video = generate(
        f"models:/{DEMO_MODEL}@{alias}", prompt, workdir / "generated.gif", tracking_uri=tracking_uri, steps=8, fps=8
    )
    console.print(f"wrote {video} ({prompt!r})", highlight=False)
    print_next_steps(workdir, dataset, tracking_uri, console)
    return {"curate": trained["curate"], "finetune": trained, "generated": video}


def print_next_steps(workdir: Path, dataset: Path, tracking_uri: str, console: Console) -> None:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    prefect_ui = (
        f"open {api.removesuffix('/api')}/runs"
        if api
        else "(Prefect's temporary server: its runs are gone; unset VIDTUNE_LOCAL_SERVER to keep them)"
    )
    run = workdir / "runs" / "style-lora"
    console.rule("[bold]where to look")
    console.print(
        f"Prefect UI: {prefect_ui}\n"
        "            (the finetune run, its curate/evaluate/register subflows, task runs, logs, and the artifacts\n"
        "             curate-summary, finetune-summary, evaluation, evaluation-metrics, promotion-gate, the MLflow\n"
        "             links model-version and mlflow-run, and the *-progress bars)\n"
        f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"            then open http://127.0.0.1:5000/#/models/{DEMO_MODEL} (versions, aliases, gate tags; the run's metrics and samples)\n"
        f"shards:     {dataset}/shards/shard-*.tar (WebDataset: mp4, txt caption, json row, npy CLIP embedding)\n"
        f"manifest:   {dataset}/manifest.parquet (every input, with status and reason); plots: {dataset}/*_hist.png\n"
        f"adapter:    {run}/adapter/pytorch_lora_weights.safetensors (pipe.load_lora_weights), comfyui_lora.safetensors (ComfyUI)\n"
        f"samples:    {run}/samples/step-*/sample-00.mp4 and .gif; base vs adapted: {RunLayout(run).contact_sheet}\n"
        f"generate:   MLFLOW_TRACKING_URI={tracking_uri} VIDTUNE_HOME={os.environ['VIDTUNE_HOME']} "
        f".venv/bin/vidtune generate --model models:/{DEMO_MODEL}@champion --prompt '{prompt_with_trigger(DEMO_PROMPTS[1], DEMO_CAPTIONS.trigger)}' --out clip.mp4\n"
        f"serve:      MLFLOW_TRACKING_URI={tracking_uri} .venv/bin/mlflow models serve -m models:/{DEMO_MODEL}@champion --env-manager local --host 127.0.0.1 (venv activated)\n"
        "deployments: prefect.yaml (curate/default, finetune/style, finetune/full, import-lora/default, evaluate/default); serve them with\n"
        "            .venv/bin/vidtune serve   (against the same server; README: the Prefect UI path)",
        highlight=False,
        soft_wrap=True,
    )
