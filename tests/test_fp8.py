"""Frozen weights in float8 (`training/fp8.py`) on the published-config tiny Wan: scaled E4M3 is closer to the
full-precision model than the unscaled cast, LoRA trains under both, and block swap moves the scaled weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidtune.training.families import get_family
from vidtune.training.families.objectives import denoising_loss
from vidtune.training.fp8 import E4M3, quantized_linears, store_fp8
from vidtune.training.offload import BlockSwap, transformer_blocks
from vidtune.training.tiny_models import build_tiny

FAMILY = get_family("wan")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return build_tiny("wan", tmp_path_factory.mktemp("wan") / "model")


def _inputs(pipe, seed: int = 0):
    video = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (1, 3, 9, 32, 32)).astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    latents = FAMILY.sample_latents(pipe, FAMILY.encode_video(pipe, video), generator)
    text = FAMILY.encode_prompts(pipe, ["a red car in sks style"])
    batches = [FAMILY.objective(pipe).inputs(latents, generator) for _ in range(2)]
    return batches, text


def _pipe(folder, fp8: str, lora: bool = False):
    pipe = FAMILY.load_pipeline(str(folder))
    pipe.transformer.requires_grad_(False)
    store_fp8(pipe.transformer, fp8, FAMILY.block_lists, torch.float32)
    if lora:
        from types import SimpleNamespace

        from vidtune.training.trainable import make_trainable

        torch.manual_seed(0)
        settings = SimpleNamespace(training_type="lora", rank=4, alpha=4, lora_dropout=0.0, lora_targets=None)
        make_trainable(FAMILY, pipe.transformer, settings)
    return pipe


def test_scaled_fp8_is_closer_to_full_precision_than_the_cast(wan):
    reference = _pipe(wan, "none")
    batches, text = _inputs(reference)
    with torch.no_grad():
        want = [FAMILY.predict(reference, b, text) for b in batches]
        errors = {}
        for mode in ("cast", "scaled"):
            pipe = _pipe(wan, mode)
            got = [FAMILY.predict(pipe, b, text) for b in batches]
            errors[mode] = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
    assert 0 < errors["scaled"] < 0.75 * errors["cast"], errors
    # What scaled stores in float8: the blocks' Linears (not norms or modulation); their biases stay as they were.
    scaled = _pipe(wan, "scaled")
    linears = quantized_linears(scaled.transformer, FAMILY.block_lists)
    assert linears and all(m.parametrizations.weight.original0.dtype == E4M3 for _, m in linears)
    assert all(m.bias is None or m.bias.dtype == torch.float32 for _, m in linears)
    assert scaled.transformer.condition_embedder.time_proj.weight.dtype == torch.float32  # outside the blocks


@pytest.mark.parametrize("fp8", ["cast", "scaled"])
def test_lora_over_float8_weights_lowers_the_loss(wan, fp8):
    pipe = _pipe(wan, fp8, lora=True)
    batches, text = _inputs(pipe)
    trained = [p for p in pipe.transformer.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=5e-3)
    losses = []
    for _ in range(8):
        loss = sum(denoising_loss(FAMILY.predict(pipe, b, text), b) for b in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(np.isfinite(losses))


def test_block_swap_moves_the_scaled_float8_weights(wan):
    """Swapped blocks hold their E4M3 values and scales in host memory; the losses equal the resident run's."""
    results = []
    for swap in (False, True):
        pipe = _pipe(wan, "scaled", lora=True)
        if swap:
            blocks = transformer_blocks(pipe.transformer, FAMILY.block_lists)
            swapper = BlockSwap(blocks, 1, torch.device("cpu"))
            masters = swapper.swapped[0].masters
            assert E4M3 in {m.dtype for m in masters}  # the stored float8, not a dequantised copy
        batches, text = _inputs(pipe)
        trained = [p for p in pipe.transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=5e-3)
        losses = []
        for _ in range(3):
            loss = sum(denoising_loss(FAMILY.predict(pipe, b, text), b) for b in batches)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results.append(losses)
    assert results[1] == pytest.approx(results[0], rel=1e-6)
