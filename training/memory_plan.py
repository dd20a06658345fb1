"""A memory plan before the first step (`vidtune plan`, and the check at the start of `finetune`): the GPU memory one
training step needs for a model, its settings and its clip sizes, line by line; whether it fits a card; and the fastest
settings that do.

What each line rests on (`LineItem.basis`):

- **arithmetic**, exact for the model's configs (`model_footprint`): the weights (each denoiser built from its config
  on the meta device, in the dtype `from_pretrained` loads it in, with the trainer's own `store_fp8`), the trained
  weights (fp32), their gradients, the optimizer state and EMA, what block swap keeps in host memory
  (`offload.BlockSwap`: the first N blocks' frozen weights, PREFETCH + 1 of them on the GPU at a time), the
  dequantised fp8 weights autograd keeps for backward, the token counts (the VAE's compression and the transformer's
  patches) and the latent cache's bytes.
- **calibrated**: the activations (`activation_memory`): per block, bytes per video token per hidden unit, per
  feed-forward unit, per LoRA rank and adapted layer and per text token; outside the blocks, per token per hidden unit
  and per latent element; what a gradient checkpoint keeps of each block (its inputs) and the peak of one block's
  recompute; the backward's workspace on top. Constants measured on the CPU with each family's tiny model and at its
  published widths (two blocks deep), re-measured by `python -m vidtune.training.activation_memory`. Attention is
  assumed memory-efficient (SDPA's flash or efficient kernels: linear in tokens), as on the CPU where it was measured.
  AnimateDiff's UNet is an approximation: one pseudo-block whose width is its levels' channels weighted by their share
  of the tokens, calibrated on tiny UNets only.
- **assumed**: a reserve for the CUDA context, kernels' workspaces and fragmentation (`CUDA_RESERVE`).

Not counted: DDP's gradient buckets with several processes, validation sampling (the VAE decodes on the GPU then, after
the step's memory is freed), and an image-to-video family's cached conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field

from vidtune.training.activation_memory import activation_bytes, activation_constants
from vidtune.training.experts import HIGH, LOW
from vidtune.training.families import ModelFamily
from vidtune.training.model_footprint import (
    Bucket,
    ModelInfo,
    cache_bytes,
    denoiser_shape,
    denoiser_weights,
    latent_grid,
    module_bytes,
)
from vidtune.training.offload import PREFETCH
from vidtune.training.params import TrainParams

GB = 10**9
CUDA_RESERVE = 1 * GB  # the CUDA context (~0.5 GB), cuBLAS/attention workspaces and allocator fragmentation: assumed


# ---- the plan ----------------------------------------------------------------------------------------------------


class LineItem(BaseModel):
    name: str
    device_bytes: int = 0
    host_bytes: int = 0
    basis: Literal["arithmetic", "calibrated", "assumed"]
    note: str = ""


class BucketLine(BaseModel):
    bucket: str
    tokens: int = Field(description="the denoiser's video tokens per clip (a UNet: latent pixels)")
    activation_bytes: int
    device_bytes: int = Field(description="the step's total at this bucket")
    cache_bytes_per_clip: int
    clips: int | None = None


class Recommendation(BaseModel):
    settings: dict[str, object] = Field(description="the changes to the run's settings (none: as planned)")
    device_bytes: int
    fits: bool
    summary: str
    drop_buckets: list[str] = Field(default_factory=list)


class MemoryPlan(BaseModel):
    """The estimate for one setting, line by line (GPU and host bytes), and the recommendation against `vram_bytes`."""

    model: str
    family: str
    settings: dict[str, object]
    vram_bytes: int | None
    items: list[LineItem]
    buckets: list[BucketLine]
    largest_bucket: str
    device_bytes: int
    host_bytes: int
    fits: bool | None
    cache_bytes: int | None = Field(None, description="the dataset's latent cache, when its clips are known")
    recommendation: Recommendation | None = None

    def table(self) -> str:
        """The plan as text: line items in GB (10^9 bytes), the total against the VRAM, buckets, recommendation."""
        s = self.settings
        head = f"memory plan: {self.model} ({self.family}), " + ", ".join(f"{k}={v}" for k, v in s.items())
        rows = [head, f"  {'line':44s} {'GPU GB':>8s} {'host GB':>8s}  basis"]
        for item in self.items:
            host = f"{item.host_bytes / GB:8.2f}" if item.host_bytes else " " * 8
            gpu = f"{item.device_bytes / GB:8.2f}" if item.device_bytes or not item.host_bytes else " " * 8
            rows.append(f"  {item.name:44s} {gpu} {host}  {item.basis}{'; ' + item.note if item.note else ''}")
        rows.append(f"  {'total':44s} {self.device_bytes / GB:8.2f} {self.host_bytes / GB:8.2f}")
        if self.vram_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(f"  GPU memory {self.vram_bytes / GB:.2f} GB: {verdict} (largest bucket {self.largest_bucket})")
        rows.append(f"  {'bucket':16s} {'tokens':>8s} {'activations GB':>15s} {'step GB':>8s} {'cache MB/clip':>14s}")
        for b in self.buckets:
            clips = f"  {b.clips} clips" if b.clips is not None else ""
            rows.append(
                f"  {b.bucket:16s} {b.tokens:8d} {b.activation_bytes / GB:15.2f} {b.device_bytes / GB:8.2f} "
                f"{b.cache_bytes_per_clip / 1e6:14.2f}{clips}"
            )
        if self.cache_bytes is not None:
            rows.append(f"  latent cache for the dataset: {self.cache_bytes / GB:.2f} GB")
        if self.recommendation is not None:
            rows.append(f"  recommendation: {self.recommendation.summary}")
        return "\n".join(rows)


@dataclass
class _Step:
    items: list[LineItem]
    buckets: list[BucketLine]
    device: int
    host: int
    largest: str


def _settings(params: TrainParams, precision: str) -> dict[str, object]:
    kind = (
        f"lora r{params.rank}"
        if params.training_type == "lora"
        else f"full{' ' + params.full_modules if params.full_modules else ''}"
    )
    settings = {
        "training": kind,
        "precision": precision,
        "fp8": params.fp8,
        "offload": params.offload,
        "blocks_to_swap": params.blocks_to_swap,
        "gradient_checkpointing": params.gradient_checkpointing,
        "batch_size": params.batch_size,
        "optimizer": params.optimizer,
    }
    return settings | ({"experts": params.experts} if params.experts else {})


def _trained_experts(info: ModelInfo, params: TrainParams) -> list[str]:
    if not info.two_experts:
        return list(info.denoisers)
    return {"high": [HIGH], "low": [LOW]}.get(params.experts or "both", [HIGH, LOW])


OPTIMIZER_BYTES = {"adamw": 8.0, "auto": 8.0, "adamw8bit": 2 + 8 / 256}  # per weight: 2 states (8-bit: + scales)


def _weight_items(info: ModelInfo, params: TrainParams, weights: dict, precision: str, swapped: int) -> list[LineItem]:
    """The denoisers' frozen weights (GPU and, swapped or idle, host), and fp8's dequantised copies."""
    stored = precision + (f", fp8 {params.fp8}" if params.fp8 != "none" else "")
    items = [
        LineItem(
            name=f"{name} weights ({stored})",
            device_bytes=w.device_bytes(swapped),
            host_bytes=w.host_bytes(swapped),
            basis="arithmetic",
            note=f"first {swapped} of {len(w.blocks)} blocks in host memory, {PREFETCH + 1} at a time on the GPU"
            if swapped
            else "",
        )
        for name, w in weights.items()
    ]
    items += [  # a two-expert model's idle expert waits on the CPU for samples
        LineItem(name=f"{name} weights (not trained)", host_bytes=module_bytes(config, precision), basis="arithmetic")
        for name, config in info.denoisers.items()
        if name not in weights
    ]
    if params.fp8 != "none":  # autograd keeps each dequantised weight until backward; a checkpoint, one block's
        per_block = max if params.gradient_checkpointing else sum
        copies = max(w.dequantised_outside + per_block(w.dequantised, default=0) for w in weights.values())
        how = "one block's, recomputed" if params.gradient_checkpointing else "every block's, until backward"
        items.append(
            LineItem(name="fp8 weights dequantised for backward", device_bytes=copies, basis="arithmetic", note=how)
        )
    return items


def _state_items(params: TrainParams, trained: list[int]) -> list[LineItem]:
    """What trains, in fp32: the weights, their gradients (one expert's per step), the optimizer state, the EMA."""
    total = sum(trained)
    items = [
        LineItem(
            name=f"{'LoRA' if params.training_type == 'lora' else 'trained'} weights (fp32)",
            device_bytes=4 * total,
            basis="arithmetic",
            note=f"{total / 1e6:.1f} M parameters",
        ),
        LineItem(
            name="gradients (fp32)",
            device_bytes=4 * max(trained),
            basis="arithmetic",
            note="one expert per step" if len(trained) > 1 else "",
        ),
        LineItem(
            name=f"optimizer state ({params.optimizer})",
            device_bytes=round(OPTIMIZER_BYTES[params.optimizer] * total),
            basis="arithmetic",
        ),
    ]
    if params.ema_decay is not None:
        items.append(LineItem(name="EMA of the trained weights (fp32)", device_bytes=4 * total, basis="arithmetic"))
    return items


def _part_items(info: ModelInfo, precision: str, data_source: str) -> list[LineItem]:
    """Encoding every step (data_source=shards): the VAE and text encoders on the GPU. From the cache: the text
    encoders are not loaded and the VAE waits on the CPU for samples."""
    on_gpu = data_source == "shards"
    return [
        LineItem(
            name=f"{name} ({'encodes every step' if on_gpu else 'for samples'})",
            basis="arithmetic",
            **{"device_bytes" if on_gpu else "host_bytes": module_bytes(config, precision)},
        )
        for name, config in info.parts.items()
        if on_gpu or name == "vae"
    ]


def _estimate(
    info: ModelInfo, params: TrainParams, buckets: dict[Bucket, int | None], precision: str, data_source: str
) -> _Step:
    """The step at `params` for each bucket: the items that do not depend on the clip size, then each bucket's
    activations; the step's total is the largest bucket's."""
    swapped = params.blocks_to_swap if params.offload == "blocks" else 0
    if not isinstance(swapped, int):
        raise ValueError("blocks_to_swap: auto is resolved before estimating (resolve_blocks_to_swap)")
    trained = _trained_experts(info, params)
    weights = {name: denoiser_weights(info.denoisers[name], info.family, params, precision) for name in trained}
    items = _weight_items(info, params, weights, precision, swapped)
    items += _state_items(params, [w.trained for w in weights.values()]) + _part_items(info, precision, data_source)
    items.append(LineItem(name="CUDA context and allocator reserve", device_bytes=CUDA_RESERVE, basis="assumed"))
    fixed = sum(item.device_bytes for item in items)
    constants = activation_constants(info.family)
    shape = denoiser_shape(info.denoisers[trained[0]], info.family, params)  # one expert trains per step
    lines = []
    for bucket, clips in buckets.items():
        grid = latent_grid(info, shape, bucket)
        peak = activation_bytes(
            constants, shape, grid, params.rank, params.batch_size, params.gradient_checkpointing
        ).peak
        lines.append(
            BucketLine(
                bucket=bucket.key,
                tokens=grid.tokens,
                activation_bytes=peak,
                device_bytes=fixed + peak,
                cache_bytes_per_clip=cache_bytes(info, grid),
                clips=clips,
            )
        )
    largest = max(lines, key=lambda line: line.activation_bytes)
    how = "block inputs + one block recomputed" if params.gradient_checkpointing else "every block's, kept for backward"
    if info.family.image_conditioned:  # calibrate() cannot run an image-to-video family's step without conditioning
        how += "; image-to-video: the text-to-video constants (the image branch is not measured)"
    activations = LineItem(
        name=f"activations ({largest.bucket}, batch {params.batch_size})",
        device_bytes=largest.activation_bytes,
        basis="calibrated",
        note=how,
    )
    items.insert(-1, activations)
    return _Step(items, lines, largest.device_bytes, sum(item.host_bytes for item in items), largest.bucket)


def _precision(params: TrainParams, precision: str | None) -> str:
    """The weight dtype planned for: given, else the setting; auto plans for a GPU with bf16."""
    return precision or (params.mixed_precision if params.mixed_precision != "auto" else "bf16")


def _with(params: TrainParams, changes: dict) -> TrainParams | None:
    """`params` with `changes`, validated as the trainer would be (for another machine); None when refused."""
    values = params.model_dump(include=set(TrainParams.model_fields)) | {"fp8_storage": False} | changes
    try:
        return TrainParams.model_validate(values, context={"remote": True})
    except ValueError:
        return None


def _block_count(info: ModelInfo, params: TrainParams, precision: str) -> int:
    return min(
        len(denoiser_weights(info.denoisers[n], info.family, params, precision).blocks)
        for n in _trained_experts(info, params)
    )


def _candidates(info: ModelInfo, params: TrainParams, precision: str):
    """Settings from the fastest to the most frugal: bf16 without swap (checkpointing as set, then on); fp8 (scaled,
    or cast for a UNet); then the fewest swapped blocks with fp8 scaled, and without fp8 (a full fine-tune)."""
    checkpointing = [params.gradient_checkpointing] + ([True] if not params.gradient_checkpointing else [])
    fp8 = "scaled" if info.family.block_lists else "cast"
    for mode in ("none", fp8):
        for ckpt in checkpointing:
            yield {"fp8": mode, "offload": "none", "blocks_to_swap": 0, "gradient_checkpointing": ckpt}
    if info.family.block_lists:
        blocks = _block_count(info, params, precision)
        for mode in ("scaled", "none"):
            for count in range(1, blocks + 1):
                yield {"fp8": mode, "offload": "blocks", "blocks_to_swap": count, "gradient_checkpointing": True}


def _flags(changes: dict, params: TrainParams) -> str:
    changed = {k: v for k, v in changes.items() if getattr(params, k) != v}
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items()) or "as set"


def recommend(
    info: ModelInfo, params: TrainParams, buckets: dict[Bucket, int | None], vram: int, precision: str, data_source: str
) -> Recommendation:
    """The first of `_candidates` whose step fits `vram` at every bucket; else the most frugal one, with the buckets
    to leave out and the most frames that fit at their sizes."""
    last = None
    for changes in _candidates(info, params, precision):
        candidate = _with(params, changes)
        if candidate is None:
            continue
        if candidate.offload == "blocks":
            weights = denoiser_weights(
                info.denoisers[_trained_experts(info, candidate)[0]], info.family, candidate, precision
            )
            if not all(weights.blocks[: candidate.blocks_to_swap]):
                continue  # nothing frozen to swap (a full fine-tune of every weight)
        step = _estimate(info, candidate, buckets, precision, data_source)
        if last is None or step.device < last[2].device:
            last = (changes, candidate, step)  # the most frugal so far: what the buckets are fitted to
        if step.device <= vram:
            summary = f"{_flags(changes, params)}: {step.device / GB:.2f} GB of {vram / GB:.2f} GB"
            return Recommendation(settings=changes, device_bytes=step.device, fits=True, summary=summary)
    changes, candidate, step = last
    flags = _flags(changes, params)
    floor = step.device - max(line.activation_bytes for line in step.buckets)  # the weights and state alone
    too_big = [Bucket.parse(line.bucket) for line in step.buckets if line.device_bytes > vram]
    if floor > vram:
        summary = (
            f"does not fit at any clip size: even {'as set' if flags == 'as set' else 'with ' + flags} the weights "
            f"and state take {floor / GB:.2f} GB of {vram / GB:.2f} GB"
        )
        return Recommendation(settings=changes, device_bytes=floor, fits=False, summary=summary)
    shorter = {bucket: _most_frames(info, candidate, bucket, vram, precision, data_source) for bucket in too_big}
    notes = [
        f"{b.key}: at most {f} frames fit" if f else f"{b.key}: no length fits at {b.height}x{b.width}"
        for b, f in shorter.items()
    ]
    fitting = [line.device_bytes for line in step.buckets if line.device_bytes <= vram]
    summary = f"{flags}, and leave out or shorten buckets ({'; '.join(notes)}: precompute.frame_buckets, curate.clips.buckets; `vidtune plan --bucket`)"
    return Recommendation(
        settings=changes,
        device_bytes=max(fitting, default=floor),
        fits=bool(fitting) or any(shorter.values()),
        summary=summary,
        drop_buckets=[b.key for b in too_big],
    )


def _most_frames(info, params, bucket: Bucket, vram: int, precision: str, data_source: str) -> int | None:
    """The most frames the family's VAE takes, fewer than `bucket`'s, whose step fits at its height and width."""
    for frames in range(bucket.frames - 1, 1, -1):
        shorter = {Bucket(frames, bucket.height, bucket.width): None}
        if (
            info.family.valid_num_frames(frames)
            and _estimate(info, params, shorter, precision, data_source).device <= vram
        ):
            return frames
    return None


def resolve_blocks_to_swap(
    info: ModelInfo, params: TrainParams, buckets: dict[Bucket, int | None], vram: int, precision: str, data_source: str
) -> int:
    """`blocks_to_swap: auto`: the fewest blocks (at least 1) whose swap makes the step fit `vram` with the other
    settings as they are; every block when none does (the start check then warns)."""
    blocks = _block_count(info, params.model_copy(update={"blocks_to_swap": 1}), precision)
    for count in range(1, blocks + 1):
        candidate = params.model_copy(update={"blocks_to_swap": count})
        if _estimate(info, candidate, buckets, precision, data_source).device <= vram:
            return count
    return blocks


def plan_memory(
    model: str,
    params: TrainParams,
    buckets: list[Bucket] | dict[Bucket, int | None],
    vram: int | None = None,
    family: str | ModelFamily | None = None,
    data_source: str = "cache",
    precision: str | None = None,
) -> MemoryPlan:
    """The memory plan of training `model` with `params` on clips of `buckets` (optionally with their clip counts),
    against `vram` bytes of GPU memory when given (then with a recommendation)."""
    info = ModelInfo.read(model, family)
    precision = _precision(params, precision)
    buckets = buckets if isinstance(buckets, dict) else dict.fromkeys(buckets)
    if not buckets:
        raise ValueError("memory plan: no buckets to plan for")
    if params.blocks_to_swap == "auto":
        if vram is None:
            raise ValueError("blocks_to_swap: auto needs the GPU memory to fit (--vram, or a GPU here)")
        params = params.model_copy(
            update={"blocks_to_swap": resolve_blocks_to_swap(info, params, buckets, vram, precision, data_source)}
        )
    step = _estimate(info, params, buckets, precision, data_source)
    counts = [(line.clips, line.cache_bytes_per_clip) for line in step.buckets]
    cache = sum(c * b for c, b in counts) if all(c is not None for c, _ in counts) else None
    return MemoryPlan(
        model=model,
        family=info.family.name,
        settings=_settings(params, precision),
        vram_bytes=vram,
        items=step.items,
        buckets=step.buckets,
        largest_bucket=step.largest,
        device_bytes=step.device,
        host_bytes=step.host,
        fits=None if vram is None else step.device <= vram,
        cache_bytes=cache,
        recommendation=None if vram is None else recommend(info, params, buckets, vram, precision, data_source),
    )


# ---- at the start of finetune ------------------------------------------------------------------------------------


def device_memory() -> int | None:
    """The current CUDA device's total memory in bytes, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


@dataclass
class StartCheck:
    plan: MemoryPlan
    blocks_to_swap: int
    warning: str | None


def check_before_training(
    model: str,
    family: ModelFamily,
    params: TrainParams,
    buckets: dict[str, int],
    device_bytes: int | None,
    data_source: str = "cache",
) -> StartCheck:
    """The run's plan against the GPU's memory (`device_bytes`): `blocks_to_swap: auto` resolved (refused without a
    GPU: swap sizes itself to a GPU's memory, and a CPU run has none to fit; set a number), and a warning naming the
    recommendation when the estimate exceeds the memory. Training goes on either way: the estimate may be wrong."""
    if params.blocks_to_swap == "auto" and device_bytes is None:
        raise ValueError(
            "blocks_to_swap: auto fits the swap to this machine's GPU memory, and no GPU is here; set a number "
            "(`vidtune plan --model MODEL --config FILE --vram 24GB` recommends one)"
        )
    plan = plan_memory(
        model, params, {Bucket.parse(k): n for k, n in buckets.items()}, device_bytes, family, data_source
    )
    warning = None
    if device_bytes is not None and not plan.fits:
        warning = (
            f"memory plan: this run's step is estimated at {plan.device_bytes / GB:.2f} GB, more than the GPU's "
            f"{device_bytes / GB:.2f} GB (largest bucket {plan.largest_bucket}); recommended: {plan.recommendation.summary}"
        )
    return StartCheck(plan, plan.settings["blocks_to_swap"], warning)


def parse_vram(text: str) -> int:
    """'24GB' (10^9 bytes), '24GiB' (2^30), '24' (GB), '800MB', '80 GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gb|gib|g|mb|mib|tb|tib)?\s*", text.lower())
    if not match:
        raise ValueError(f"--vram: {text!r} is not a memory size; write e.g. 24GB, 24GiB or 24 (GB)")
    scale = {None: GB, "g": GB, "gb": GB, "gib": 2**30, "mb": 10**6, "mib": 2**20, "tb": 10**12, "tib": 2**40}
    return round(float(match.group(1)) * scale[match.group(2)])
