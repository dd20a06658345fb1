"""The step's precision and speed settings on the published-config tiny Wan: frozen weights in float8
(`training/fp8.py`: scaled E4M3 is closer to full precision than the unscaled cast, LoRA trains under both, block
swap moves the scaled weights), compiled blocks (the eager loss and gradients) and the attention backend check."""

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


def _train(pipe, steps: int) -> list[float]:
    """`steps` AdamW steps of the LoRA on fixed batches; the losses."""
    batches, text = _inputs(pipe)
    trained = [p for p in pipe.transformer.parameters() if p.requires_grad]
    assert trained
    optimizer = torch.optim.AdamW(trained, lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = sum(denoising_loss(FAMILY.predict(pipe, b, text), b) for b in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


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
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters() if p.requires_grad)
    losses = _train(pipe, steps=8)
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
        results.append(_train(pipe, steps=3))
    assert results[1] == pytest.approx(results[0], rel=1e-6)


def test_compiled_blocks_give_the_eager_loss_and_gradients(wan):
    """`compile: blocks` compiles each transformer block in place (here with aot_eager, the graph capture and the
    autograd split the default inductor backend also runs, without its minute of C++ builds on a CPU)."""
    from vidtune.training.offload import compile_blocks, transformer_blocks

    results = []
    for compiled in (False, True):
        pipe = _pipe(wan, "none", lora=True)
        if compiled:
            compile_blocks(transformer_blocks(pipe.transformer, FAMILY.block_lists), backend="aot_eager")
        batches, text = _inputs(pipe)
        loss = sum(denoising_loss(FAMILY.predict(pipe, b, text), b) for b in batches)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in pipe.transformer.parameters() if p.requires_grad]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-8) for g, w in zip(results[1][1], results[0][1]))


def test_an_attention_backend_that_cannot_run_is_refused_naming_its_package():
    from vidtune.training.params import TrainParams

    with pytest.raises(ValueError, match=r"attention_backend: flash cannot run here: .*flash-attn"):
        TrainParams(attention_backend="flash")
    with pytest.raises(ValueError, match=r"sage cannot train: SageAttention has no backward pass"):
        TrainParams(attention_backend="sage")  # installed or not: its LoRA would get no gradients
    with pytest.raises(ValueError, match="compile: blocks is not combined with offload=blocks"):
        TrainParams(compile="blocks", offload="blocks", blocks_to_swap=1)
    assert TrainParams().attention_backend == "native"
