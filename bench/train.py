"""Trainer throughput and memory, side by side, in one run on this machine.

Model ("tiny but not trivial", built here with the real diffusers classes, saved with `save_pretrained` and
loaded by the trainer with `from_pretrained`, the path users take): WanTransformer3DModel with 4 layers, 4 heads
x 32 (inner dim 128), ffn 256, text dim 32, patch (1, 2, 2), 16 latent channels: ~0.98 M parameters. The VAE
and UMT5 text encoder are the tiny ones of `vidtune.training.tiny_models.build_tiny_wan`.
Data: synthetic videos curated by `vidtune.flows.curate` to 128x128 @ 8 fps clips, cached by `vidtune.training.cache.precompute`.
Every leg trains on the 17-frame bucket only, so every step has the same shape in every leg (5 latent frames x
8 x 8 patches = 320 tokens per clip); batch size 2, LoRA rank 4 on the attention projections, fp32 on CPU.

Legs, each a fresh `train(TrainJob(...))` in its own subprocess (max RSS only ever grows within a process):
    cache        LoRA, gradient checkpointing on (the TrainParams default), latent cache    <- shared baseline
    on-the-fly   as cache, data_source=shards: decode + VAE + text encoder every step
    no-ckpt      as cache, gradient checkpointing off
    full         as cache, training_type=full
    floor        not train(): a bare PyTorch loop (forward, loss, backward, AdamW step, zero_grad) with the cache
                 leg's model, LoRA, checkpointing, batch and precision, on its cached batches held in memory
Prints samples/s (the trainer's TrainResult figure, and a steady one from the median step after --warmup steps),
peak memory (max RSS, and how much it grew during train(): on CPU the libraries alone hold ~0.9 GB), trainable
parameters, the ratio for each pair, and vidtune's default leg as a fraction of the floor (goal: at least 0.9). About 1.5 minutes on 2 CPU cores; run it on an otherwise idle machine
(a step-time p90 far above its p50 says something else was using the CPU).

    .venv/bin/python bench/train.py [--steps 20] [--warmup 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAN = dict(
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=32,
    ffn_dim=256,
    text_dim=32,
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
CLIPS, FRAMES, BATCH, RANK = dict(width=128, height=128, fps=8), 17, 2, 4
LEGS = {  # name -> (TrainJob.data_source, TrainParams overrides)
    "cache": ("cache", {}),
    "on-the-fly": ("shards", {}),
    "no-ckpt": ("cache", {"gradient_checkpointing": False}),
    "full": ("cache", {"training_type": "full"}),
}
FLOOR = "floor"  # a bare PyTorch loop over the cache leg's model and data (run_floor), not a train() run
PAIRS = [
    ("on-the-fly / cache", "on-the-fly", "cache"),
    ("ckpt on / off", "cache", "no-ckpt"),
    ("full / LoRA", "full", "cache"),
    ("cache / floor", "cache", FLOOR),
]


def build_wan(folder: Path) -> int:
    """The tiny Wan of `build_tiny_wan` (its VAE, UMT5, tokenizer and published scheduler) with the benchmark's
    larger transformer in place of the tiny one; returns the transformer's parameter count."""
    import torch
    from diffusers import WanTransformer3DModel

    from vidtune.training.tiny_models import build_tiny_wan

    build_tiny_wan(folder)
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**WAN)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)  # replaces the tiny one's files
    return sum(p.numel() for p in transformer.parameters())


def prepare(work: Path) -> dict:
    """Model, curated shards and latent cache, made once and shared by every leg."""
    import vidtune.tasks  # noqa: F401  (Prefect defaults, before flows import prefect)
    from vidtune.flows.curate import CurateParams, curate
    from vidtune.tasks.synthetic_videos import make_raw_video_set
    from vidtune.training.cache import PrecomputeParams, precompute
    from vidtune.training.data import cache_shards, summarize_dataset
    from vidtune.training.families import get_family
    from vidtune.training.tiny_models import TINY_CLIP, build_tiny_clip

    params = build_wan(work / "wan")
    make_raw_video_set(work / "raw", seed=1, seconds=8.0)  # 8 s: enough shots reach 17 frames at 8 fps
    clip = build_tiny_clip(work / "tiny-clip.safetensors")
    curate(
        CurateParams(
            input=str(work / "raw"),
            output=str(work / "data"),
            clips=CLIPS,
            scores={"clip_model": TINY_CLIP, "clip_pretrained": str(clip)},
        )
    )
    summary = summarize_dataset(work / "data", [FRAMES], "wan")
    family = get_family("wan")
    pipe = family.load_pipeline(str(work / "wan"))
    cached = precompute(
        summary.shards, family, pipe, str(work / "wan"), work / "cache", PrecomputeParams(frame_buckets=[FRAMES])
    )
    return {
        "transformer_params": params,
        "clips": summary.clips,
        "train_clips": sum(summary.buckets.values()),
        "shards": summary.shards,
        "cache_shards": cache_shards(cached.cache_dir),
    }


def max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_leg(work: Path, name: str, steps: int, warmup: int) -> dict:
    """One fresh training run; step times come from on_step, so model loading and the final export are excluded."""
    # Imported now so that their memory is not counted as training's (the trainer imports them lazily).
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import WanPipeline  # noqa: F401
    from mlflow.tracking import MlflowClient

    from vidtune.training.job import TrainJob
    from vidtune.training.params import TrainParams
    from vidtune.training.trainer import train

    data = json.loads((work / "prepared.json").read_text())
    source, overrides = LEGS[name]
    params = TrainParams(
        max_steps=steps, batch_size=BATCH, rank=RANK, mixed_precision="no", checkpoint_every=10**6, **overrides
    )
    uri = f"sqlite:///{work}/mlflow.db"
    job = TrainJob(
        model=str(work / "wan"),
        family="wan",
        out=str(work / "runs" / name),
        data_source=source,
        shards=data["cache_shards" if source == "cache" else "shards"],
        frame_buckets=[FRAMES],
        sample_size=(FRAMES, CLIPS["height"], CLIPS["width"]),
        params=params,
        tracking_uri=uri,
        run_name=f"bench-{name}",
    )
    before, stamps = max_rss_mb(), []
    result = train(job, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    step_s = [b - a for a, b in itertools.pairwise(stamps)][warmup:]
    trainable = MlflowClient(uri).get_run(result.mlflow_run_id).data.params["trainable_parameters"]
    p50, p90 = statistics.median(step_s), statistics.quantiles(step_s, n=10, method="inclusive")[-1]
    return {
        "trainer_sps": result.samples_per_s,
        "steady_sps": BATCH / p50,
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "peak_mb": result.peak_memory_mb,
        "growth_mb": result.peak_memory_mb - before,
        "trainable": int(trainable),
    }


def load_cached_batches(work: Path, cache_shards: list[str]) -> list[tuple]:
    """Every cached clip as (normalised latents, text embeddings), paired into batches of BATCH, read once. The
    posterior is sampled once here (the trainer draws a fresh sample per step: a randn the size of the latents)."""
    import tarfile
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKLWan

    from vidtune.training.cache import load_cache_entry
    from vidtune.training.families import get_family

    entries = {}
    for shard in cache_shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, kind = member.name.split(".", 1)
                entries.setdefault(key, {})[kind] = tar.extractfile(member).read()
    vae = AutoencoderKLWan.from_pretrained(work / "wan", subfolder="vae")  # only its latent normalisation is used
    family, clips = get_family("wan"), []
    for key in sorted(entries):
        entry = load_cache_entry(entries[key])
        clips.append(
            (family.sample_latents(SimpleNamespace(vae=vae), entry["latents"].unsqueeze(0))[0], entry["text"]["embeds"])
        )
    pairs = [[clips[(i + j) % len(clips)] for j in range(BATCH)] for i in range(0, len(clips), BATCH)]
    return [(torch.stack([c[0] for c in pair]), torch.stack([c[1] for c in pair])) for pair in pairs]


def run_floor(work: Path, steps: int, warmup: int) -> dict:
    """The floor: the same transformer, LoRA, checkpointing, batch and fp32, in a bare loop (forward, loss,
    backward, AdamW step, zero_grad) on batches already in memory: what training costs with no framework around it."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from vidtune.training.families import get_family
    from vidtune.training.params import TrainParams

    defaults, data = TrainParams(), json.loads((work / "prepared.json").read_text())
    before = max_rss_mb()
    torch.manual_seed(defaults.seed)
    batches = load_cached_batches(work, data["cache_shards"])
    transformer = WanTransformer3DModel.from_pretrained(work / "wan", subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(get_family("wan").default_lora_targets))
    )
    if defaults.gradient_checkpointing:  # as the default leg (cache) runs
        transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=defaults.learning_rate, weight_decay=defaults.weight_decay)
    stamps = [time.perf_counter()]
    for step in range(steps):
        latents, text = batches[step % len(batches)]
        s, noise = torch.sigmoid(torch.randn(BATCH, 1, 1, 1, 1)), torch.randn_like(latents)  # logit-normal noise levels
        noisy, target = (1 - s) * latents + s * noise, noise - latents  # rectified flow
        pred = transformer(
            hidden_states=noisy, timestep=1000 * s.flatten(), encoder_hidden_states=text, return_dict=False
        )[0]
        torch.nn.functional.mse_loss(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    step_s = [b - a for a, b in itertools.pairwise(stamps[1:])][warmup:]  # intervals between steps, as on_step gives
    p50, p90 = statistics.median(step_s), statistics.quantiles(step_s, n=10, method="inclusive")[-1]
    peak = max_rss_mb()
    return {
        "trainer_sps": steps * BATCH / (stamps[-1] - stamps[0]),
        "steady_sps": BATCH / p50,
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "peak_mb": peak,
        "growth_mb": peak - before,
        "trainable": sum(p.numel() for p in trainable),
    }


def in_child(work: Path, flag: str, name: str, args: argparse.Namespace) -> dict:
    """Run this script with `flag` in a fresh interpreter (its output goes to a log); return the JSON it wrote."""
    out, log = work / f"{name}.json", work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VIDTUNE_HOME": str(work), "PREFECT_HOME": str(work / "prefect")}  # nothing lands in ~/
    cmd = [
        sys.executable,
        __file__,
        flag,
        name,
        "--workdir",
        str(work),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    started = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed; the end of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def header(data: dict, args: argparse.Namespace) -> None:
    import torch  # only to say which build and how many threads; the parent otherwise stays small

    tokens = (
        ((FRAMES - 1) // 4 + 1) * (CLIPS["height"] // 16) * (CLIPS["width"] // 16)
    )  # VAE 4x time, 8x space; patch 2x2
    print(
        f"\nWan transformer: {WAN['num_layers']} layers, {WAN['num_attention_heads']} heads x {WAN['attention_head_dim']}, "
        f"ffn {WAN['ffn_dim']}, text dim {WAN['text_dim']}, patch {WAN['patch_size']}: {data['transformer_params'] / 1e6:.2f} M params; "
        "tiny VAE + UMT5 of build_tiny_wan"
    )
    print(
        f"data: {data['train_clips']} of {data['clips']} curated clips reach {FRAMES} frames "
        f"({CLIPS['width']}x{CLIPS['height']} @ {CLIPS['fps']} fps, {tokens} tokens each); batch {BATCH}, LoRA rank {RANK}, fp32"
    )
    print(
        f"run: {args.steps} steps, steady = median of steps {args.warmup + 2}-{args.steps}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n"
    )


def report(results: dict) -> None:
    print(
        f"{'leg':12s} {'trainable':>10s} {'samples/s':>10s} {'steady/s':>9s} {'step ms p50/p90':>16s} {'peak RSS MB':>12s} {'RSS growth MB':>14s}"
    )
    for name, r in results.items():
        steps = f"{r['p50_ms']:.0f} / {r['p90_ms']:.0f}"  # a p90 far above p50: something else used the CPU
        print(
            f"{name:12s} {r['trainable']:10,d} {r['trainer_sps']:10.2f} {r['steady_sps']:9.2f} {steps:>16s} {r['peak_mb']:12.0f} {r['growth_mb']:14.0f}"
        )
    print(f"\n{'ratio':20s} {'speed':>7s} {'peak RSS':>9s} {'RSS growth':>11s}   (steady samples/s; memory)")
    for label, a, b in PAIRS:
        x, y = results[a], results[b]
        print(
            f"{label:20s} {x['steady_sps'] / y['steady_sps']:7.2f} {x['peak_mb'] / y['peak_mb']:9.2f} {x['growth_mb'] / y['growth_mb']:11.2f}"
        )
    on, off = results["cache"], results["no-ckpt"]
    saved, slower = off["growth_mb"] - on["growth_mb"], off["steady_sps"] / on["steady_sps"]
    print(
        f"\ngradient checkpointing: saves {saved:.0f} MB of RSS growth ({saved / off['growth_mb']:.0%}; "
        f"{saved / off['peak_mb']:.0%} of the peak) and costs {slower:.2f}x the time per sample ({slower - 1:+.0%})"
    )
    lora, full = (results[n]["trainable"] * 12 / 2**20 for n in ("cache", "full"))  # fp32 grad + 2 AdamW moments
    print(
        f"full fine-tuning: gradients + AdamW state of ~{full:.1f} MB vs ~{lora:.1f} MB for LoRA; compare with the RSS growth above"
    )
    ours, floor = results["cache"], results[FLOOR]
    print(
        f"vidtune vs the bare-PyTorch floor: the default leg (cache) runs at {ours['steady_sps'] / floor['steady_sps']:.2f} of the floor's "
        f"steady samples/s ({ours['trainer_sps'] / floor['trainer_sps']:.2f} by whole-run samples/s); goal >= 0.90"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per leg.")
    parser.add_argument("--warmup", type=int, default=3, help="Step intervals left out of the steady samples/s.")
    parser.add_argument("--workdir", type=Path, help="Work folder (default: a new temporary one, removed at the end).")
    parser.add_argument(
        "--keep", action="store_true", help="Keep the work folder (models, data, runs, logs, mlflow.db)."
    )
    parser.add_argument("--prepare", metavar="NAME", help=argparse.SUPPRESS)  # internal: the child processes
    parser.add_argument("--leg", choices=[*LEGS, FLOOR], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error("--steps must leave at least 2 step intervals after --warmup")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="vidtune-bench-train-"))).resolve()
    if args.prepare or args.leg:  # child: do one thing, write its JSON for the parent
        if args.prepare:
            result = prepare(work)
        elif args.leg == FLOOR:
            result = run_floor(work, args.steps, args.warmup)
        else:
            result = run_leg(work, args.leg, args.steps, args.warmup)
        (work / f"{args.prepare or args.leg}.json").write_text(json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}\nprepare (model, curate, latent cache) and legs, each in a fresh process:", flush=True)
    data = in_child(work, "--prepare", "prepared", args)
    shutil.rmtree(
        work / "runs", ignore_errors=True
    )  # a reused --workdir: the trainer refuses an out folder with checkpoints
    results = {name: in_child(work, "--leg", name, args) for name in [*LEGS, FLOOR]}
    header(data, args)
    report(results)
    if args.keep or args.workdir:
        print(f"\nkept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
