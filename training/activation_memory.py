"""The memory plan's calibrated part: the activations of a training step, as a formula per family whose constants
were measured on the CPU, and the measurement and fit that re-derive them.

    .venv/bin/python -m vidtune.training.activation_memory [FAMILY ...]

runs one training forward, loss and backward of each family's denoiser as the trainer does at mixed_precision=bf16
(bf16 weights, a fp32 LoRA, bf16 autocast) in three variants, each with two blocks per block list, at two clip sizes:
the tiny model's (`vidtune tiny-model`), the same with the LoRA rank doubled, and the published checkpoint's widths
(its config with only the depth cut to two blocks; random weights, random prompt embeddings); AnimateDiff's UNet,
whose depth is its structure, is widened instead. It prints the constants to paste into `ACTIVATIONS`, and every
run's measured bytes beside the fitted formula's.

Two measures, both of CPU allocations:
- saved: the bytes autograd keeps for backward, summed over unique storages (`saved_tensors_hooks`, deduplicated by
  `untyped_storage().data_ptr()`; parameters left out), each attributed to the block that first saved it (else: outside
  the blocks);
- peak: the most bytes alive at once during the step, over every tensor an op creates (a `TorchDispatchMode` that
  tracks storages until they are freed), less what is still alive after it (the LoRA's gradients).
Checkpointing hides a block's saved tensors from the hooks, so with it only the peak is measured.

Attention runs through torch's SDPA, whose CPU kernel is a flash attention (it saves the output and log-sum-exp, not
the scores): memory linear in tokens, as the flash and memory-efficient kernels on a GPU. What the CPU cannot show: CUDA
autocast runs a few more ops in fp32 (layer_norm, softmax), which may add to families with plain LayerNorms; the GPU
bench (`bench/real_size.py --gpu`) measures the real peak.
"""

from __future__ import annotations

import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidtune.training.families import ModelFamily, TextEmbeddings, get_family
from vidtune.training.families.objectives import denoising_loss
from vidtune.training.model_footprint import (
    BASE_FAMILY,
    TEXT_DIM_KEYS,
    UNET,
    Bucket,
    DenoiserShape,
    Grid,
    ModelInfo,
    build_module,
    denoiser_shape,
    latent_grid,
    read_config,
)
from vidtune.training.params import TrainParams
from vidtune.training.published_configs import published_config
from vidtune.training.trainable import make_trainable


@dataclass(frozen=True)
class BlockActivations:
    """Calibrated bytes one block keeps for backward: per video token per hidden unit (`hidden`), per feed-forward
    unit (`ffn`; 0 where the family fixes the ratio, which `hidden` then includes), per LoRA rank and adapted Linear
    (`lora`), per text token per hidden unit (`text`); and what a gradient checkpoint keeps instead: the block's
    inputs, per video token and per text token per hidden unit (`inputs`, `inputs_text`)."""

    hidden: float
    ffn: float
    lora: float
    text: float
    inputs: float
    inputs_text: float


@dataclass(frozen=True)
class FamilyActivations:
    """A family's calibrated activation constants: its block lists'; what the embeddings, head and loss keep (per video
    token per hidden unit and per latent element, per text token per hidden unit); the backward's peak above what is
    kept, per video token per hidden unit and per latent element (`workspace_*`); and with checkpointing, the peak of
    one block's recompute and backward in units of the largest block's saved bytes, plus per latent element
    (`recomputed*`). `checkpointed`: for a UNet, the checkpointed peak as a share of the plain one instead."""

    blocks: dict[str, BlockActivations]
    outside_hidden: float
    outside_latent: float
    outside_text: float
    workspace_hidden: float
    workspace_latent: float
    recomputed: float
    recomputed_latent: float
    checkpointed: float | None = None


# Measured on the CPU (torch 2.14, diffusers 0.42) and fitted by `python -m vidtune.training.activation_memory`, which
# prints this table and each run's measured bytes beside the formula's (all within 10 %, most within 3 %). Per family,
# one forward, loss and backward as the trainer runs them at mixed_precision=bf16 (bf16 weights, a fp32 LoRA, bf16
# autocast), at two clip sizes, of three variants with two blocks per list: the tiny model, the same with the LoRA rank
# doubled, and the published checkpoint's widths (Wan 2.1 1.3B, LTX-Video, CogVideoX-2b, HunyuanVideo; AnimateDiff's
# tiny UNet widened instead); bytes autograd saves, summed over unique storages and attributed to the block running;
# the peak from the live bytes of every tensor the step creates; a non-negative least-squares fit relative to each run.
ACTIVATIONS: dict[str, FamilyActivations] = {
    "wan": FamilyActivations(
        blocks={
            "blocks": BlockActivations(hidden=50.083, ffn=1.492, lora=1.981, text=13.278, inputs=2.0, inputs_text=0.0)
        },
        outside_hidden=0.562,
        outside_latent=5.265,
        outside_text=0.0,
        workspace_hidden=19.357,
        workspace_latent=12.26,
        recomputed=1.339,
        recomputed_latent=0.0,
        checkpointed=None,
    ),
    "ltx-video": FamilyActivations(
        blocks={
            "transformer_blocks": BlockActivations(
                hidden=55.936, ffn=0.0, lora=2.674, text=14.042, inputs=2.0, inputs_text=0.0
            )
        },
        outside_hidden=3.931,
        outside_latent=3.831,
        outside_text=0.0,
        workspace_hidden=13.262,
        workspace_latent=0.0,
        recomputed=1.303,
        recomputed_latent=2.819,
        checkpointed=None,
    ),
    "cogvideox": FamilyActivations(
        blocks={
            "transformer_blocks": BlockActivations(
                hidden=31.458, ffn=0.0, lora=5.394, text=34.723, inputs=2.0, inputs_text=2.0
            )
        },
        outside_hidden=0.0,
        outside_latent=3.677,
        outside_text=0.0,
        workspace_hidden=22.205,
        workspace_latent=9.361,
        recomputed=1.434,
        recomputed_latent=0.841,
        checkpointed=None,
    ),
    "hunyuan-video": FamilyActivations(
        blocks={
            "transformer_blocks": BlockActivations(
                hidden=39.845, ffn=0.0, lora=3.695, text=33.206, inputs=2.0, inputs_text=2.0
            ),
            "single_transformer_blocks": BlockActivations(
                hidden=35.382, ffn=0.0, lora=5.033, text=37.766, inputs=2.0, inputs_text=2.0
            ),
        },
        outside_hidden=1.276,
        outside_latent=5.275,
        outside_text=62.618,
        workspace_hidden=41.824,
        workspace_latent=1.679,
        recomputed=1.606,
        recomputed_latent=0.0,
        checkpointed=None,
    ),
    "animatediff": FamilyActivations(
        blocks={
            "unet": BlockActivations(hidden=672.124, ffn=0.0, lora=1.269, text=149.186, inputs=0.254, inputs_text=2.032)
        },
        outside_hidden=0.0,
        outside_latent=4.0,
        outside_text=0.0,
        workspace_hidden=0.0,
        workspace_latent=0.0,
        recomputed=0.0,
        recomputed_latent=0.0,
        checkpointed=0.496,
    ),
}


def activation_constants(family: ModelFamily) -> FamilyActivations:
    name = BASE_FAMILY.get(family.name, family.name)
    if name not in ACTIVATIONS:
        raise ValueError(f"memory plan: no calibrated activation constants for family {family.name}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class Activations:
    saved: int  # what autograd keeps for backward without checkpointing (the calibration's measure)
    peak: int  # the step's activation peak at the settings: kept bytes plus the backward's workspace
    largest_block: int  # one block's saved bytes (the largest list's): the unit of a checkpointed recompute


def activation_bytes(
    constants: FamilyActivations, shape: DenoiserShape, grid: Grid, rank: int, batch: int, checkpointing: bool
) -> Activations:
    """bytes ~ tokens x (per-block terms x blocks + outside terms); see `BlockActivations` and `FamilyActivations`."""
    tokens, text, hidden = grid.tokens * batch, grid.text_tokens * batch, shape.hidden
    per_block = {
        name: tokens * (c.hidden * hidden + c.ffn * shape.widths[name] + c.lora * rank * shape.lora_layers[name])
        + text * c.text * hidden
        for name, c in constants.blocks.items()
    }
    outside = tokens * (constants.outside_hidden * hidden + constants.outside_latent * shape.latent_per_token)
    outside += text * constants.outside_text * hidden
    largest = max(per_block.values())
    saved = outside + sum(shape.blocks[name] * per_block[name] for name in per_block)
    latent = tokens * shape.latent_per_token
    plain = saved + tokens * constants.workspace_hidden * hidden + latent * constants.workspace_latent
    if not checkpointing:
        peak = plain
    elif constants.checkpointed is not None:
        peak = constants.checkpointed * plain
    else:
        inputs = sum(
            shape.blocks[name] * hidden * (tokens * c.inputs + text * c.inputs_text)
            for name, c in constants.blocks.items()
        )
        peak = outside + inputs + constants.recomputed * largest + latent * constants.recomputed_latent
    return Activations(round(saved), round(peak), round(largest))


# ---- measuring on the CPU ----------------------------------------------------------------------------------------


RANK = 4
PROMPT = "a red car drives down a city street at night"


@dataclass(frozen=True)
class Calibration:
    """How a family is measured: the config keys that give each block list two blocks; the published variant whose
    widths are measured (a TINY_MODELS name; None: the tiny config widened by `wider`); the tiny sizes, the published
    widths' (fewer tokens: the CPU computes them at full width); `check`: a tiny size the fit never sees (the tests')."""

    depth: tuple[str, ...]
    published: str | None
    sizes: tuple[Bucket, Bucket]
    published_sizes: tuple[Bucket, Bucket]
    check: Bucket
    wider: dict = field(default_factory=dict)


CALIBRATION = {
    "wan": Calibration(
        ("num_layers",),
        "wan",
        (Bucket(17, 128, 128), Bucket(33, 256, 256)),
        (Bucket(17, 128, 128), Bucket(17, 192, 256)),
        Bucket(21, 192, 320),
    ),
    "ltx-video": Calibration(
        ("num_layers",),
        "ltx-video",
        (Bucket(17, 256, 256), Bucket(33, 512, 512)),
        (Bucket(17, 256, 256), Bucket(25, 384, 512)),
        Bucket(25, 384, 640),
    ),
    "cogvideox": Calibration(
        ("num_layers",),
        "cogvideox",
        (Bucket(9, 128, 128), Bucket(17, 256, 256)),
        (Bucket(9, 128, 128), Bucket(13, 192, 256)),
        Bucket(13, 192, 320),
    ),
    "hunyuan-video": Calibration(
        ("num_layers", "num_single_layers"),
        "hunyuan-video",
        (Bucket(9, 128, 128), Bucket(17, 256, 256)),
        (Bucket(9, 128, 128), Bucket(9, 192, 256)),
        Bucket(13, 192, 320),
    ),
    "animatediff": Calibration(
        (),
        None,
        (Bucket(8, 64, 64), Bucket(16, 128, 128)),
        (Bucket(8, 64, 64), Bucket(16, 128, 128)),
        Bucket(12, 64, 128),
        wider={"block_out_channels": [32, 32, 32, 32]},
    ),
}


class LiveBytes(TorchDispatchMode):
    """The most bytes alive at once among the storages of tensors ops create while active (each tracked until freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if key and key not in self.tracked and key not in given:  # a view or in-place result: not new
                    self.tracked.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, size)
        return out


@dataclass
class Measurement:
    """One training step of a model at one size: bytes autograd saved per block (each list's blocks in order) and
    outside them, the bytes of each block's input tensors not given to an earlier block, and the step's peak."""

    saved: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    outside: int = 0
    peak: int = 0

    @property
    def saved_total(self) -> int:
        return self.outside + sum(sum(v) for v in self.saved.values())


def training_pipe(family: ModelFamily, folder: Path, config: dict, rank: int, checkpointing: bool):
    """The tiny pipeline in bf16 with its denoiser built from `config` (random weights) and a fp32 LoRA of `rank`,
    as the trainer sets it up."""
    denoiser = build_module(config, torch.bfloat16, device="cpu")
    pipe = family.load_pipeline(str(folder), dtype=torch.bfloat16, **{family.denoiser_name: denoiser})
    denoiser.requires_grad_(False)
    make_trainable(family, denoiser, TrainParams(rank=rank, max_steps=1))
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return pipe


def prompt_embeddings(family: ModelFamily, pipe, config: dict) -> TextEmbeddings:
    """The pipeline's embedding of a prompt; for a denoiser wider than its text encoder (the published widths),
    random values of the shapes it takes (the same tokens and mask)."""
    text = family.encode_prompts(pipe, [PROMPT])
    dim = next(config[key] for key in TEXT_DIM_KEYS if config.get(key))
    if text.embeds.shape[-1] == dim:
        return text
    pooled = None if text.pooled is None else torch.randn(1, config["pooled_projection_dim"], dtype=text.pooled.dtype)
    return TextEmbeddings(torch.randn(*text.embeds.shape[:-1], dim, dtype=text.embeds.dtype), text.mask, pooled)


def _block_lists(family: ModelFamily, denoiser: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    return {UNET: [denoiser]} if not family.block_lists else {n: list(getattr(denoiser, n)) for n in family.block_lists}


def measure_step(family: ModelFamily, pipe, grid: Grid, text: TextEmbeddings, seed: int = 0) -> Measurement:
    """One forward (bf16 autocast), loss and backward of the pipeline's denoiser on random latents of `grid`'s shape
    and `text`: the bytes saved per block and outside (see the module docstring) and the step's peak."""
    denoiser = getattr(pipe, family.denoiser_name)
    weights = {t.untyped_storage().data_ptr() for t in [*denoiser.parameters(), *denoiser.buffers()]}
    lists = _block_lists(family, denoiser)
    measured = Measurement({n: [0] * len(b) for n, b in lists.items()}, {n: [0] * len(b) for n, b in lists.items()})
    running: list[tuple[str, int] | None] = [None]
    owners: dict[int, tuple[tuple[str, int] | None, int]] = {}
    given: set[int] = set(weights)

    def enter(where):
        def hook(module, args, kwargs):
            running[0] = where
            for tensor in tree_flatten((args, kwargs))[0]:
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in given:
                    given.add(tensor.untyped_storage().data_ptr())
                    measured.inputs[where[0]][where[1]] += tensor.untyped_storage().nbytes()

        return hook

    def leave(module, args, output):
        running[0] = None

    handles = [
        h
        for name, blocks in lists.items()
        for i, block in enumerate(blocks)
        for h in (
            block.register_forward_pre_hook(enter((name, i)), with_kwargs=True),
            block.register_forward_hook(leave),
        )
    ]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in weights and key not in owners:
            owners[key] = (running[0], storage.nbytes())
        return tensor

    latents = torch.randn((1, *grid.latent), generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)
    objective = family.objective(pipe)
    live = LiveBytes()
    try:
        with live:
            with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
                inputs = objective.inputs(latents, torch.Generator().manual_seed(seed))
                loss = denoising_loss(family.predict(pipe, inputs, text), inputs)
            loss.backward()
            del loss, inputs
    finally:
        for handle in handles:
            handle.remove()
    measured.peak = live.peak - live.live
    for where, size in owners.values():
        if where is None:
            measured.outside += size
        else:
            measured.saved[where[0]][where[1]] += size
    denoiser.zero_grad(set_to_none=True)
    return measured


# ---- the fit -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    shape: DenoiserShape
    grid: Grid
    rank: int
    plain: Measurement
    checkpointed: Measurement | None = None


def _per_block(measured: Measurement, name: str) -> float:
    """A block's bytes, from the blocks after the first (the first also saves what every block shares)."""
    values = measured.saved[name]
    return float(np.mean(values[1:] if len(values) > 1 else values))


def _per_block_inputs(measured: Measurement, name: str) -> float:
    values = measured.inputs[name]
    return float(np.mean(values[1:] if len(values) > 1 else values))


def _solve(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares relative to each measurement (tiny and published widths weigh alike); a column that
    is zero or a multiple of an earlier one (a ratio no variant changes) is left at 0, its share in the earlier one's."""
    x, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    keep = []
    for j in range(x.shape[1]):
        column = x[:, j] / (np.abs(x[:, j]).max() or 1)
        if column.any() and not any(np.allclose(column, x[:, k] / np.abs(x[:, k]).max()) for k in keep):
            keep.append(j)
    scale = 1 / np.maximum(np.abs(y), 1)
    solution = np.zeros(x.shape[1])
    while keep:  # no term is negative: one that fits so is noise, and left out
        values = np.linalg.lstsq(x[:, keep] * scale[:, None], y * scale, rcond=None)[0]
        if values.min() >= 0:
            solution[keep] = values
            break
        keep.pop(int(values.argmin()))
    return [round(float(v), 3) for v in solution]


def fit(runs: list[Run]) -> FamilyActivations:
    """The constants from the runs: per block list (hidden, ffn, lora, text; inputs, inputs_text), outside
    (hidden, latent, text), the backward's peak above what is kept (hidden, latent), and with checkpointing the
    recompute's (blocks, latent)."""
    blocks = {}
    for name in runs[0].plain.saved:
        rows, ys, in_rows, in_ys = [], [], [], []
        for r in runs:
            t, tt, h = r.grid.tokens, r.grid.text_tokens, r.shape.hidden
            rows.append([t * h, t * r.shape.widths[name], t * r.rank * r.shape.lora_layers[name], tt * h])
            ys.append(_per_block(r.plain, name))
            in_rows.append([t * h, tt * h])
            in_ys.append(_per_block_inputs(r.plain, name))
        blocks[name] = BlockActivations(*_solve(rows, ys), *_solve(in_rows, in_ys))
    rows, ys = [], []
    for r in runs:
        t, tt, h = r.grid.tokens, r.grid.text_tokens, r.shape.hidden
        rows.append([t * h, t * r.shape.latent_per_token, tt * h])
        shared = sum(sum(v) - len(v) * _per_block(r.plain, n) for n, v in r.plain.saved.items())
        ys.append(r.plain.outside + shared)  # what the first block saved for every block counts once, outside
    outside = _solve(rows, ys)
    draft = FamilyActivations(blocks, *outside, 0.0, 0.0, 0.0, 0.0)
    plain = [activation_bytes(draft, r.shape, r.grid, r.rank, 1, False) for r in runs]
    workspace = _solve(
        [[r.grid.tokens * r.shape.hidden, r.grid.tokens * r.shape.latent_per_token] for r in runs],
        [r.plain.peak - a.saved for r, a in zip(runs, plain)],
    )
    checked = [r for r in runs if r.checkpointed is not None]
    if UNET in blocks:  # a UNet: the checkpointed peak as a share of the plain one
        share = np.mean([r.checkpointed.peak / r.plain.peak for r in checked])
        return FamilyActivations(blocks, *outside, *workspace, 0.0, 0.0, round(float(share), 3))
    kept = [activation_bytes(draft, r.shape, r.grid, r.rank, 1, True) for r in checked]  # outside + blocks' inputs
    recomputed = _solve(
        [[a.largest_block, r.grid.tokens * r.shape.latent_per_token] for r, a in zip(checked, kept)],
        [r.checkpointed.peak - a.peak for r, a in zip(checked, kept)],
    )
    return FamilyActivations(blocks, *outside, *workspace, *recomputed)


def variants(name: str, model: Path) -> list[tuple[str, dict, int, tuple[Bucket, Bucket]]]:
    """(label, denoiser config, LoRA rank, sizes) of the three variants of family `name` (see the module docstring)."""
    from vidtune.training.tiny_models import tiny_spec

    family, plan = get_family(name), CALIBRATION[name]
    tiny = read_config(str(model), f"{family.denoiser_name}/config.json") | dict.fromkeys(plan.depth, 2)
    if plan.published is None:
        wide = ("wide", tiny | plan.wider, RANK, plan.sizes)
    else:
        part = tiny_spec(plan.published).parts[family.denoiser_name]
        published = published_config(part.repo, f"{part.path}/config.json") | dict.fromkeys(plan.depth, 2)
        wide = (f"{part.repo} widths", published, RANK, plan.published_sizes)
    return [("tiny", tiny, RANK, plan.sizes), ("tiny, rank x2", tiny, 2 * RANK, plan.sizes), wide]


def calibrate(name: str, folder: Path, echo=print) -> tuple[FamilyActivations, list[Run]]:
    """Measure family `name` in its three variants at their two sizes (checkpointed too, but for the rank variant),
    and fit."""
    from vidtune.training.tiny_models import build_tiny

    family = get_family(name)
    model = build_tiny(name, folder / name)
    info = ModelInfo.read(str(model), family)
    runs = []
    for label, config, rank, sizes in variants(name, model):
        shape = denoiser_shape(config, family, TrainParams(rank=rank))
        grids = [latent_grid(info, shape, bucket) for bucket in sizes]
        grids = [Grid((config["in_channels"], *g.latent[1:]), g.tokens, g.text_tokens) for g in grids]
        for checkpointing in (False, True) if rank == RANK else (False,):
            pipe = training_pipe(family, model, config, rank, checkpointing)
            text = prompt_embeddings(family, pipe, config)
            for i, grid in enumerate(grids):
                measured = measure_step(family, pipe, grid, text)
                if checkpointing:
                    runs[-len(grids) + i].checkpointed = measured
                else:
                    runs.append(Run(shape, grid, rank, measured))
                what = f"saved {measured.saved_total:,}, " if not checkpointing else "checkpointed, "
                echo(f"  {name} {label} {sizes[i].key}: {grid.tokens} tokens, {what}peak {measured.peak:,} bytes")
            del pipe
    return fit(runs), runs


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(CALIBRATION)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            constants, runs = calibrate(name, Path(tmp))
            print(f"    {name!r}: {constants!r},")
            for r in runs:
                estimate = activation_bytes(constants, r.shape, r.grid, r.rank, 1, False)
                ckpt = activation_bytes(constants, r.shape, r.grid, r.rank, 1, True)
                checked = f", checkpointed {r.checkpointed.peak:,} vs {ckpt.peak:,}" if r.checkpointed else ""
                print(
                    f"      # hidden {r.shape.hidden}, {r.grid.tokens} tokens, rank {r.rank}: saved {r.plain.saved_total:,}"
                    f" vs {estimate.saved:,}, peak {r.plain.peak:,} vs {estimate.peak:,}{checked}"
                )


if __name__ == "__main__":
    main()
