"""What each family weighs at its published size, and what a LoRA of it weighs.

Every component is built from the published config stored in `training/model_configs/` (the same parts as
`vidtune.training.tiny_models.TINY_MODELS`, without the shrink overrides) on the meta device: random weights, no
download, no memory, so the 14B models cost nothing. Per component: parameters and bytes at bf16; for the
components a LoRA trains (the denoiser, and AnimateDiff's motion adapter, which sits inside the trained
UNetMotionModel): the LoRA at rank 32 on the family's `default_lora_targets`, i.e. rank * (in + out) parameters
for every nn.Linear whose module name ends with a target, in bytes at fp32 (how vidtune saves the adapter) and
at bf16. GB and MB are 10^9 and 10^6 bytes.

    .venv/bin/python bench/real_size.py [--rank 32] [--models wan wan-14b ...] [--json PATH]

With --gpu (a CUDA machine only): Wan LoRA rank 32 training at 81 x 480 x 832 in bf16 with random weights at the
published sizes (no download), each leg in its own process: the 1.3B with gradient checkpointing on and off, fp8
cast and scaled, and each attention backend installed; the 14B under a 24 GiB cap: 81 frames with all 40 blocks
swapped (the memory plan says it does not fit) and 49 frames with fp8 scaled and blocks_to_swap=auto; and block swap against the resident model with both CUDA streams delayed (equal loss and gradients).
Each leg prints the memory plan's estimate (`vidtune plan`) beside its measured peak.
Peak memory and s/step, against SimpleTuner's published figures. Not yet run on a GPU by us.
`--gpu --dry-run` runs every leg at tiny sizes on the CPU in seconds (the test suite does, so it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vidtune.training.families import get_family  # noqa: E402
from vidtune.training.model_footprint import as_loaded  # noqa: E402
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


# ---- GPU legs: Wan LoRA training at 81 x 480 x 832, each leg in its own process ---------------------------------


@dataclass(frozen=True)
class Leg:
    model: str  # a TINY_MODELS name: its published transformer config (shrunk with --dry-run)
    checkpointing: bool = True
    fp8: str = "none"
    attention: str = "native"
    blocks_to_swap: int | str = 0  # "auto": as the memory plan resolves it under the leg's cap
    memory_cap_gib: float | None = None  # torch.cuda.set_per_process_memory_fraction: a smaller card
    frames: int = 81


LEGS = {
    "1.3b-ckpt": Leg("wan"),
    "1.3b-no-ckpt": Leg("wan", checkpointing=False),
    "1.3b-fp8-cast": Leg("wan", fp8="cast"),
    "1.3b-fp8-scaled": Leg("wan", fp8="scaled"),
    # Where installed; not sage, which has no backward pass (TrainParams refuses it).
    **{f"1.3b-{b}": Leg("wan", attention=b) for b in ("flash", "_flash_3", "flex")},
    # The memory plan puts the 14B's 81-frame step over 24 GB even with every block swapped (the activations
    # alone are ~26 GB): the first leg checks that verdict; the second trains 49 frames, swap sized by the plan.
    "14b-swap-24gb": Leg("wan-14b", blocks_to_swap=40, memory_cap_gib=24),
    "14b-fp8-swap-24gb-49f": Leg("wan-14b", fp8="scaled", blocks_to_swap="auto", memory_cap_gib=24, frames=49),
}
# Published figures to compare with: SimpleTuner's Wan 2.1 LoRA r16, 832 x 480 x 81, per-block checkpointing, H100.
PUBLISHED = {"wan": (2.10, 4.73), "wan-14b": (7.16, 16.3)}  # (s/step, GiB)
FRAMES, HEIGHT, WIDTH = 81, 480, 832


def latent_shape(dry_run: bool, frames: int = FRAMES) -> tuple[int, ...]:
    frames, height, width = (9, 32, 32) if dry_run else (frames, HEIGHT, WIDTH)
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)  # Wan VAE: 4x in time after frame 0, 8x in space


def runnable(name: str, dry_run: bool) -> str | None:
    """Why leg `name` cannot run here, or None."""
    from vidtune.training.params import attention_backend_problem

    leg = LEGS.get(name, Leg("wan"))
    if leg.attention != "native":
        if dry_run and leg.attention == "flex":
            return "flex attention on a CPU compiles for minutes"
        return attention_backend_problem(leg.attention)
    return None


def leg_plan(leg: Leg, rank: int) -> tuple[int, float]:
    """(blocks to swap, the memory plan's GiB) for the leg at its published size: `auto` resolved by the plan under
    the leg's cap (what `finetune` does with the GPU's memory), and the estimate to print beside the measured peak."""
    from vidtune.training.memory_plan import CUDA_RESERVE, plan_memory
    from vidtune.training.model_footprint import Bucket
    from vidtune.training.params import TrainParams

    params = TrainParams(
        rank=rank,
        max_steps=1,
        fp8=leg.fp8,
        gradient_checkpointing=leg.checkpointing,
        offload="blocks" if leg.blocks_to_swap else "none",
        blocks_to_swap=leg.blocks_to_swap,
    )
    vram = int(leg.memory_cap_gib * 2**30) if leg.memory_cap_gib else None
    repo = tiny_spec(leg.model).parts["transformer"].repo
    plan = plan_memory(repo, params, [Bucket(leg.frames, HEIGHT, WIDTH)], vram, family="wan")
    return int(plan.settings["blocks_to_swap"]), (plan.device_bytes - CUDA_RESERVE) / 2**30


def random_transformer(leg: Leg, dry_run: bool, device: str) -> torch.nn.Module:
    """The published transformer (sizes shrunk with --dry-run) with random bf16 weights, as from_pretrained(bf16)
    loads it (fp32 where the class keeps modules in fp32), built without an fp32 copy: on the meta device, then
    allocated where it trains from (the host for a swapped model) and filled; the buffers (RoPE tables) from a
    one-block build, as they do not depend on the depth."""
    import diffusers

    part = tiny_spec(leg.model).parts["transformer"]
    config = published_config(part.repo, f"{part.path}/config.json") | (part.shrink if dry_run else {})
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = as_loaded(cls.from_config(config), torch.bfloat16)
    model.to_empty(device="cpu")  # filled from a CPU generator: the same weights whatever the leg's device
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        shallow = cls.from_config({**config, "num_layers": 1})
        for name, buffer in shallow.named_buffers():
            model.get_buffer(name).copy_(buffer)
    return model if leg.blocks_to_swap else model.to(device)  # a swapped model moves after its swap is set up


def transformer_for_training(leg: Leg, rank: int, dry_run: bool, device: str, swap: int = 0) -> torch.nn.Module:
    """The trainer's own set-up of a denoiser (`_make_denoiser_trainable`: fp8 storage, LoRA in fp32,
    checkpointing), with the leg's attention backend first and its block swap last, as `_prepare_model` orders them."""
    from vidtune.training.offload import BlockSwap, transformer_blocks
    from vidtune.training.params import TrainParams
    from vidtune.training.trainer import _make_denoiser_trainable

    family = get_family("wan")
    transformer = random_transformer(leg, dry_run, device)
    if leg.attention != "native":
        transformer.set_attention_backend(leg.attention)
    params = TrainParams(rank=rank, max_steps=1, fp8=leg.fp8, gradient_checkpointing=leg.checkpointing)
    _make_denoiser_trainable(SimpleNamespace(params=params, export_comfyui=False), family, transformer, torch.bfloat16)
    if swap:
        blocks = transformer_blocks(transformer, family.block_lists)
        transformer.swap = BlockSwap(blocks, min(swap, len(blocks)), torch.device(device))
        transformer.to(device)
    return transformer


def gpu_leg(name: str, steps: int, warmup: int, rank: int, dry_run: bool) -> dict:
    """Forward, vidtune's objective and loss, backward and an AdamW step, `steps` times on random latents and text
    embeddings (the cached-latents case: no VAE or text encoder is loaded). Returns peak memory and s/step.
    With --dry-run: the same code at tiny sizes on the CPU (every leg, in seconds), so this script cannot rot."""
    from vidtune.training.families.base import TextEmbeddings

    leg, device = LEGS[name], "cpu" if dry_run else "cuda"
    if leg.memory_cap_gib and not dry_run:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, leg.memory_cap_gib * 2**30 / total))
    swap, plan_gib = leg_plan(leg, rank)
    transformer = transformer_for_training(leg, rank, dry_run, device, swap)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    family = get_family("wan")
    part = tiny_spec(leg.model).parts["transformer"]
    pipe = SimpleNamespace(scheduler=published_scheduler(part.repo), transformer=transformer, config={})
    objective = family.objective(pipe, None)
    text_dim = transformer.config.text_dim
    latents = torch.randn(latent_shape(dry_run, leg.frames), device=device, dtype=torch.bfloat16)
    text = TextEmbeddings(torch.randn((1, 16 if dry_run else 512, text_dim), device=device, dtype=torch.bfloat16))
    generator = torch.Generator(device).manual_seed(0)
    cuda = device == "cuda"
    setup_mb = torch.cuda.memory_allocated() / 2**20 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # from here: weights held plus what training adds
    step_s = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):  # what the trainer's accelerator.autocast() does at bf16
            inputs = objective.inputs(latents, generator)
            pred = family.predict(pipe, inputs, text, denoiser=transformer)
        loss = (inputs.weighting.float() * (pred.float() - inputs.target.float()) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - started)
    return {
        "leg": name,
        "model": leg.model,
        "frames": leg.frames,
        "blocks_to_swap": swap,
        "plan_gib": plan_gib,
        "setup_mb": setup_mb,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else 0.0,
        "s_per_step": statistics.median(step_s[warmup:]),
        "loss": loss.item(),
        "trainable": sum(p.numel() for p in trainable),
    }


SWAP_CHECK = "1.3b-swap-equal"  # a leg of its own: block swap against the resident model, with the streams delayed
SLEEP_CYCLES = 20_000_000  # ~10 ms on an H100: longer than a small block's copy or compute


def swap_check(rank: int, dry_run: bool) -> dict:
    """The 1.3B (29 of its 30 blocks swapped) against itself resident, at a small size: loss and LoRA gradients
    after two steps must agree. Twice on CUDA: once with every swap copy first sleeping on the side stream (the
    weights land late: a compute that does not wait for them reads memory not yet filled), once with every block's
    compute first sleeping on the compute stream (the compute runs late: memory freed or refilled before it is done
    gives other numbers). So a missing wait or an early free shows as a different result instead of passing by
    luck of timing. On the CPU (--dry-run) the same code runs at tiny sizes without the sleeps."""
    from vidtune.training.families.base import TextEmbeddings
    from vidtune.training.offload import BlockSwap

    device = "cpu" if dry_run else "cuda"
    shape = (1, 16, 3, 16, 16) if not dry_run else latent_shape(True)  # 9 x 128 x 128 pixels on a GPU
    family = get_family("wan")
    results = {}
    for swap, late in ((0, None), (29, "copies"), (29, "compute")):
        leg, undo = Leg("wan", blocks_to_swap=swap), []
        if device == "cuda" and late == "copies":
            original_fill = BlockSwap._fill

            def slow_fill(block, non_blocking, _fill=original_fill):
                torch.cuda._sleep(SLEEP_CYCLES)  # inside the side stream's context: the copy lands late
                return _fill(block, non_blocking)

            BlockSwap._fill = staticmethod(slow_fill)
            undo.append(lambda: setattr(BlockSwap, "_fill", staticmethod(original_fill)))
        try:
            torch.manual_seed(0)  # the LoRA's initial weights
            transformer = transformer_for_training(leg, rank, dry_run, device, swap)
            if device == "cuda" and late == "compute":
                for block in transformer.blocks:  # after the swap's own hooks: the compute stream runs late
                    block.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(SLEEP_CYCLES))
            part = tiny_spec("wan").parts["transformer"]
            pipe = SimpleNamespace(scheduler=published_scheduler(part.repo), transformer=transformer, config={})
            objective = family.objective(pipe, None)
            generator = torch.Generator(device).manual_seed(0)
            latents = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator)
            text_shape = (1, 16 if dry_run else 512, transformer.config.text_dim)
            text = TextEmbeddings(torch.randn(text_shape, device=device, dtype=torch.bfloat16, generator=generator))
            trainable = [p for p in transformer.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-3)
            losses = []
            for _ in range(2):
                with torch.autocast(device, dtype=torch.bfloat16):
                    inputs = objective.inputs(latents, generator)
                    pred = family.predict(pipe, inputs, text, denoiser=transformer)
                loss = ((pred.float() - inputs.target.float()) ** 2).mean()
                loss.backward()
                grads = torch.cat([p.grad.float().flatten() for p in trainable])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            results[late] = (losses, grads.cpu())
            del transformer, optimizer
        finally:
            for step in undo:
                step()
    resident_losses, resident_grads = results[None]
    out = {"leg": SWAP_CHECK, "model": "wan", "resident_losses": resident_losses, "agree": True}
    for late in ("copies", "compute"):
        losses, grads = results[late]
        error = ((grads - resident_grads).norm() / resident_grads.norm()).item()
        # The first forward is deterministic (same weights and inputs); flash backward may not be, hence 1e-2.
        agree = (
            losses[0] == resident_losses[0]
            and error < 1e-2
            and abs(losses[1] - resident_losses[1]) <= 1e-2 * abs(resident_losses[1])
        )
        out |= {f"{late}_late_losses": losses, f"{late}_late_grad_error": error}
        out["agree"] &= agree
    out["grad_relative_error"] = max(out["copies_late_grad_error"], out["compute_late_grad_error"])
    return out


def one_leg(name: str, steps: int, warmup: int, rank: int, dry_run: bool) -> dict:
    return swap_check(rank, dry_run) if name == SWAP_CHECK else gpu_leg(name, steps, warmup, rank, dry_run)


def run_gpu_legs(args: argparse.Namespace) -> list[dict]:
    """Each leg in a fresh interpreter, so peak memory is that leg's alone; a leg that fails is reported, not fatal."""
    results = []
    for leg in [*LEGS, SWAP_CHECK]:
        why_not = runnable(leg, args.dry_run)
        if why_not:
            results.append({"leg": leg, "skipped": why_not})
            print(f"  {leg}: skipped ({why_not})", flush=True)
            continue
        if args.dry_run:  # on the CPU nothing is to be isolated: every leg in this process, in seconds
            started = time.perf_counter()
            result = one_leg(leg, args.steps, args.warmup, args.rank, True)
            results.append(result | {"wall_s": time.perf_counter() - started})
            print(f"  {leg}: done", flush=True)
            continue
        cmd = [sys.executable, __file__, "--gpu-leg", leg, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--rank", str(args.rank)] + (["--dry-run"] if args.dry_run else [])
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            results.append(json.loads(lines[-1]) | {"wall_s": time.perf_counter() - started})
        else:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"leg": leg, "error": reason})
        print(f"  {leg}: {'failed: ' + results[-1]['error'] if 'error' in results[-1] else 'done'}", flush=True)
    return results


def print_gpu_table(results: list[dict], rank: int, dry_run: bool) -> None:
    size = "tiny sizes on the CPU (--dry-run)" if dry_run else f"F x {HEIGHT} x {WIDTH}"
    print(f"\nWan LoRA rank {rank}, {size}, bf16, batch 1; published: SimpleTuner r16 on an H100 at 81 frames")
    print("  plan GiB: the memory plan's estimate at the leg's published size, less its 1 GB reserve")
    header = f"  {'leg':22s} {'F':>3s} {'swap':>4s} {'plan GiB':>9s} {'peak GiB':>9s} {'s/step':>8s} {'loss':>8s}"
    print(f"{header} {'wall s':>7s}   vs published (s/step, GiB)")
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"  {r['leg']:22s} {'failed: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        if r["leg"] == SWAP_CHECK:
            verdict = "agree" if r["agree"] else "DIFFER"
            error = r["grad_relative_error"]
            print(f"  {r['leg']:22s} swap vs resident, streams delayed: {verdict} (gradient error {error:.1e})")
            continue
        seconds, gib = PUBLISHED[r["model"]]
        peak = r["peak_mb"] / 1024
        ratio = ""
        if not dry_run and r["frames"] == FRAMES:
            ratio = f"   {r['s_per_step'] / seconds:.2f}x, {peak / gib:.2f}x of {seconds} s, {gib} GiB"
        print(
            f"  {r['leg']:22s} {r['frames']:3d} {r['blocks_to_swap']:4d} {r['plan_gib']:9.2f} {peak:9.2f} "
            f"{r['s_per_step']:8.2f} {r['loss']:8.4f} {r['wall_s']:7.1f}{ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    parser.add_argument("--gpu", action="store_true", help="Run the Wan training legs instead (needs CUDA).")
    parser.add_argument("--dry-run", action="store_true", help="With --gpu: every leg at tiny sizes on the CPU.")
    parser.add_argument("--steps", type=int, default=5, help="GPU: optimizer steps per leg.")
    parser.add_argument("--warmup", type=int, default=2, help="GPU: steps left out of s/step.")
    parser.add_argument(
        "--gpu-leg", choices=[*LEGS, SWAP_CHECK], help=argparse.SUPPRESS
    )  # internal: one leg, in a child
    args = parser.parse_args()
    if (args.gpu or args.gpu_leg) and not args.dry_run and not torch.cuda.is_available():
        parser.error(
            "--gpu needs a CUDA GPU (torch.cuda.is_available() is False here); without it this prints the size tables"
        )
    if args.gpu_leg:
        print(json.dumps(one_leg(args.gpu_leg, args.steps, args.warmup, args.rank, args.dry_run)))
        return
    if args.gpu:
        if args.steps <= args.warmup:
            parser.error("--steps must exceed --warmup")
        results = run_gpu_legs(args)
        print_gpu_table(results, args.rank, args.dry_run)
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
