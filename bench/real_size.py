"""What each family weighs at its published size, and what a LoRA of it weighs.

Every component is built from the published config stored in `training/model_configs/` (the same parts as
`vidtune.training.tiny_models.TINY_MODELS`, without the shrink overrides) on the meta device: random weights, no
download, no memory, so the 14B models cost nothing. Per component: parameters and bytes at bf16; for the
components a LoRA trains (the denoiser, and AnimateDiff's motion adapter, which sits inside the trained
UNetMotionModel): the LoRA at rank 32 on the family's `default_lora_targets`, i.e. rank * (in + out) parameters
for every nn.Linear whose module name ends with a target, in bytes at fp32 (how vidtune saves the adapter) and
at bf16. GB and MB are 10^9 and 10^6 bytes.

    .venv/bin/python bench/real_size.py [--rank 32] [--models wan wan-14b ...] [--json PATH]

With --gpu (a CUDA machine only): Wan 2.1 1.3B LoRA training at 49 x 480 x 832, peak memory and s/step with
gradient checkpointing on and off, fp8 storage and group offloading (see `gpu_leg`). Not yet run on a GPU by us.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vidtune.training.families import get_family  # noqa: E402
from vidtune.training.families.wan import WAN_13B  # noqa: E402
from vidtune.training.published_configs import build_from_config, published_config, published_scheduler  # noqa: E402
from vidtune.training.tiny_models import TINY_MODELS, tiny_spec  # noqa: E402

MODELS = list(TINY_MODELS)
TRAINED_WITH_DENOISER = ("motion_adapter",)  # the pipeline merges it into the denoiser, so the LoRA lands on it too


def build_published(repo: str, path: str) -> torch.nn.Module:
    """One component from its published config, full size, on the meta device (shapes only, no storage)."""
    with torch.device("meta"):
        return build_from_config(published_config(repo, f"{path}/config.json"))


def lora_linears(module: torch.nn.Module, targets: tuple[str, ...]) -> list[torch.nn.Linear]:
    """The nn.Linear layers peft adapts for `targets`: a module name equal to a target or ending in `.target`."""
    return [
        m
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]


def component_size(module: torch.nn.Module, targets: tuple[str, ...] | None, rank: int) -> dict:
    """Parameter count and bf16 bytes; with `targets`, the LoRA of rank `rank` on them (A: rank x in, B: out x rank)."""
    params = sum(p.numel() for p in module.parameters())  # parameters() counts tied weights once
    size = {"class": type(module).__name__, "params": params, "bf16_bytes": 2 * params}
    if targets is not None:
        layers = lora_linears(module, targets)
        lora = sum(rank * (layer.in_features + layer.out_features) for layer in layers)
        size |= {
            "lora_layers": len(layers),
            "lora_params": lora,
            "lora_fp32_bytes": 4 * lora,
            "lora_bf16_bytes": 2 * lora,
        }
    return size


def model_sizes(name: str, rank: int) -> dict:
    """Every model component of one TINY_MODELS entry at its published size."""
    spec, family = tiny_spec(name), TINY_MODELS[name]
    trained = (family.denoiser_name, *TRAINED_WITH_DENOISER)
    components = {}
    for part_name, part in spec.parts.items():
        if part_name == "scheduler":
            continue
        module = build_published(part.repo, part.path)
        components[part_name] = component_size(
            module, family.default_lora_targets if part_name in trained else None, rank
        )
        del module
    denoiser = spec.parts[family.denoiser_name]
    return {
        "repo": denoiser.repo,
        "family": family.name,
        "rank": rank,
        "lora_targets": list(family.default_lora_targets),
        "components": components,
    }


def count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def nbytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def print_table(name: str, sizes: dict) -> None:
    rank, rows = sizes["rank"], sizes["components"]
    print(f"\n{name}  ({sizes['repo']}; LoRA rank {rank} on {', '.join(sizes['lora_targets'])})")
    print(
        f"  {'component':16s} {'class':30s} {'params':>10s} {'bf16':>9s}   {'LoRA layers':>11s} {'LoRA params':>11s} {'fp32':>9s} {'bf16':>9s}"
    )
    for part, r in rows.items():
        lora = (
            ""
            if "lora_params" not in r
            else (
                f"{r['lora_layers']:11d} {count(r['lora_params']):>11s} {nbytes(r['lora_fp32_bytes']):>9s} {nbytes(r['lora_bf16_bytes']):>9s}"
            )
        )
        print(f"  {part:16s} {r['class']:30s} {count(r['params']):>10s} {nbytes(r['bf16_bytes']):>9s}   {lora}")
    total = sum(r["params"] for r in rows.values())
    lora_total = sum(r.get("lora_params", 0) for r in rows.values())
    print(
        f"  {'total':16s} {'':30s} {count(total):>10s} {nbytes(2 * total):>9s}   {'':11s} {count(lora_total):>11s} "
        f"{nbytes(4 * lora_total):>9s} {nbytes(2 * lora_total):>9s}"
    )


# ---- GPU leg: Wan 2.1 1.3B LoRA training at 49 x 480 x 832 ------------------------------------------------------

GPU_LEGS = {  # name -> (gradient checkpointing, fp8 storage, group offload)
    "ckpt": (True, False, False),
    "no-ckpt": (False, False, False),
    "fp8-storage": (True, True, False),
    "group-offload": (True, False, True),
}
LATENT_SHAPE = (1, 16, (49 - 1) // 4 + 1, 480 // 8, 832 // 8)  # Wan VAE: 4x in time after the first frame, 8x in space
TEXT_SHAPE = (1, 512, 4096)  # UMT5-XXL embeddings at WanPipeline's max_sequence_length
DEVICE = "cuda"


def to_bf16_as_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """bf16, except the modules the class keeps in fp32, as `from_pretrained(dtype=bf16)` (the trainer's load) does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else torch.bfloat16)
    return model


def wan_transformer_for_training(leg: str, rank: int) -> torch.nn.Module:
    """The published 1.3B transformer (random init) in bf16 with vidtune's LoRA, set up in the trainer's order:
    fp8 storage, LoRA (fp32 master weights), gradient checkpointing; group offloading last, once the LoRA exists."""
    import diffusers

    from vidtune.training.params import TrainParams
    from vidtune.training.trainable import make_trainable

    checkpointing, fp8, offload = GPU_LEGS[leg]
    config = published_config(WAN_13B, "transformer/config.json")
    with torch.device("cpu" if offload else DEVICE):  # group offloading starts from weights on the CPU
        transformer = to_bf16_as_loaded(getattr(diffusers, config["_class_name"]).from_config(config))
    if fp8:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    make_trainable(get_family("wan"), transformer, TrainParams(rank=rank, max_steps=1))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    if offload:
        transformer.enable_group_offload(
            onload_device=torch.device(DEVICE),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
        )
    return transformer.train()


def gpu_leg(leg: str, steps: int, warmup: int, rank: int) -> dict:
    """Forward, vidtune's objective and loss, backward and an AdamW step, `steps` times on random latents and text
    embeddings (the cached-latents case: no VAE or text encoder is loaded). Returns peak memory and s/step.
    Not yet run on a GPU by us: written on a CPU-only machine, so treat its first results with care."""
    from vidtune.training.families.base import TextEmbeddings

    transformer = wan_transformer_for_training(leg, rank)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    family = get_family("wan")
    pipe = SimpleNamespace(scheduler=published_scheduler(WAN_13B), transformer=transformer)
    objective = family.objective(pipe, None)
    latents = torch.randn(LATENT_SHAPE, device=DEVICE, dtype=torch.bfloat16)
    text = TextEmbeddings(torch.randn(TEXT_SHAPE, device=DEVICE, dtype=torch.bfloat16))
    generator = torch.Generator(DEVICE).manual_seed(0)
    setup_mb = torch.cuda.memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()  # from here: weights held plus what training adds, not the fp32 init spike
    step_s = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # what the trainer's accelerator.autocast() does at bf16
            inputs = objective.inputs(latents, generator)
            pred = family.predict(pipe, inputs, text, denoiser=transformer)
        loss = (inputs.weighting.float() * (pred.float() - inputs.target.float()) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        step_s.append(time.perf_counter() - started)
    return {
        "leg": leg,
        "setup_mb": setup_mb,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        "s_per_step": statistics.median(step_s[warmup:]),
        "loss": loss.item(),
        "trainable": sum(p.numel() for p in trainable),
    }


def run_gpu_legs(args: argparse.Namespace) -> list[dict]:
    """Each leg in a fresh interpreter, so peak memory is that leg's alone; a leg that fails is reported, not fatal."""
    results = []
    for leg in GPU_LEGS:
        cmd = [
            sys.executable,
            __file__,
            "--gpu-leg",
            leg,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--rank",
            str(args.rank),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"leg": leg, "error": reason})
        print(f"  {leg}: {'failed: ' + results[-1]['error'] if 'error' in results[-1] else 'done'}", flush=True)
    return results


def print_gpu_table(results: list[dict], rank: int) -> None:
    print(
        f"\nWan 2.1 1.3B, LoRA rank {rank}, 49 x 480 x 832 (latents {LATENT_SHAPE}), text {TEXT_SHAPE}, bf16, batch 1"
    )
    print(f"  {'leg':14s} {'setup MiB':>10s} {'peak MiB':>10s} {'s/step':>8s} {'loss':>8s}")
    for r in results:
        if "error" in r:
            print(f"  {r['leg']:14s} failed: {r['error']}")
        else:
            print(
                f"  {r['leg']:14s} {r['setup_mb']:10.0f} {r['peak_mb']:10.0f} {r['s_per_step']:8.2f} {r['loss']:8.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    parser.add_argument("--gpu", action="store_true", help="Run the Wan 1.3B training legs instead (needs CUDA).")
    parser.add_argument("--steps", type=int, default=6, help="GPU: optimizer steps per leg.")
    parser.add_argument("--warmup", type=int, default=2, help="GPU: steps left out of s/step.")
    parser.add_argument("--gpu-leg", choices=GPU_LEGS, help=argparse.SUPPRESS)  # internal: one leg, in a child
    args = parser.parse_args()
    if (args.gpu or args.gpu_leg) and not torch.cuda.is_available():
        parser.error(
            "--gpu needs a CUDA GPU (torch.cuda.is_available() is False here); without it this prints the size tables"
        )
    if args.gpu_leg:
        print(json.dumps(gpu_leg(args.gpu_leg, args.steps, args.warmup, args.rank)))
        return
    if args.gpu:
        if args.steps <= args.warmup:
            parser.error("--steps must exceed --warmup")
        results = run_gpu_legs(args)
        print_gpu_table(results, args.rank)
        output = {"gpu_legs": results}
    else:
        output = {name: model_sizes(name, args.rank) for name in args.models}
        for name, sizes in output.items():
            print_table(name, sizes)
    if args.json:
        args.json.write_text(json.dumps(output, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
