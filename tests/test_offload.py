"""Block swap (`training/offload.py`) on the published-config tiny models: the same losses and LoRA gradients as
the run without it, step after step, with and without gradient checkpointing, and never more blocks resident than
the unswapped ones plus the one computing and the one prefetched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidtune.training.families import get_family
from vidtune.training.families.objectives import denoising_loss
from vidtune.training.offload import PREFETCH, BlockSwap, transformer_blocks
from vidtune.training.tiny_models import TINY_MODELS, build_tiny

SWAPPED_MODELS = ["wan", "wan2.2-t2v-a14b", "hunyuan-video", "ltx-video"]


@pytest.fixture(scope="module", params=SWAPPED_MODELS)
def tiny(request, tmp_path_factory):
    name = request.param
    return TINY_MODELS[name], build_tiny(name, tmp_path_factory.mktemp(name) / "model")


def _lora_pipeline(family, folder, checkpointing: bool):
    from peft import LoraConfig

    from vidtune.training.experts import model_experts

    pipe = family.load_pipeline(str(folder))
    experts = model_experts(pipe, family.denoiser_name, None)
    denoisers = [getattr(pipe, e.module) for e in experts]
    for denoiser in denoisers:
        denoiser.requires_grad_(False)
        torch.manual_seed(0)  # the same adapter initialisation in both runs
        denoiser.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, target_modules=list(family.default_lora_targets), init_lora_weights="gaussian"
            )
        )
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
    return pipe, denoisers, experts


def _train(family, pipe, denoisers, experts, steps: int = 3):
    """`steps` AdamW steps on fixed batches (a different one each step; both experts' ranges for Wan 2.2): the
    losses, and each step's LoRA gradients."""
    video = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 9, 32, 32)).astype(np.float32))
    generator = torch.Generator().manual_seed(0)
    latents = family.sample_latents(pipe, family.encode_video(pipe, video), generator)
    text = family.encode_prompts(pipe, ["a red car in sks style"])
    objective = family.objective(pipe)
    trained = [p for d in denoisers for p in d.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    losses, grads = [], []
    for _ in range(steps):
        ranges = [(e.low, e.high) for e in experts] if len(experts) > 1 else [None, None]
        batches = [
            objective.inputs(latents, generator, within=r) if r else objective.inputs(latents, generator)
            for r in ranges
        ]
        loss = sum(denoising_loss(family.predict(pipe, batch, text), batch) for batch in batches)
        optimizer.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in trained])
        optimizer.step()
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_block_swap_trains_exactly_what_the_resident_model_trains(tiny, checkpointing):
    family, folder = tiny
    family = get_family(family.name)
    reference = _train(family, *_lora_pipeline(family, folder, checkpointing))

    pipe, denoisers, experts = _lora_pipeline(family, folder, checkpointing)
    swaps = []
    for denoiser in denoisers:
        blocks = transformer_blocks(denoiser, family.block_lists)
        swaps.append(BlockSwap(blocks, max(1, len(blocks) - 1), torch.device("cpu")))  # all but the last swapped
        frozen = [p for p in blocks[0].parameters() if not p.requires_grad]
        assert frozen and all(p.numel() == 0 for p in frozen)  # evicted: nothing on the device
    swapped = _train(family, pipe, denoisers, experts)

    for step, (want, got) in enumerate(zip(reference[0], swapped[0])):
        assert abs(got - want) <= 1e-6 * abs(want), f"step {step}: loss {got} != {want}"
    for step, (want, got) in enumerate(zip(reference[1], swapped[1])):
        worst = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for w, g in zip(want, got))
        assert worst <= 1e-6, f"step {step}: LoRA gradients differ by {worst:.2e} (relative)"
    for swap in swaps:
        # One swapped block computing and PREFETCH arriving, never more; every swapped block visited forward and back.
        assert 1 <= swap.resident_peak <= 1 + PREFETCH
        loads = [i for kind, i in swap.events if kind == "load"]
        assert set(loads) == set(swap.swapped) and loads.count(0) >= 1
        assert all(swap.swapped[i].views[0].untyped_storage().nbytes() == 0 for i in swap.swapped if i != 0)


def test_a_block_used_while_evicted_fails_loudly(tiny):
    """What makes the tests above able to fail on a CPU: an evicted block's weights hold no storage, so a forward
    or backward that reaches one without its onload raises instead of computing with stale numbers."""
    family, folder = tiny
    family = get_family(family.name)
    pipe, denoisers, experts = _lora_pipeline(family, folder, checkpointing=False)
    blocks = transformer_blocks(denoisers[0], family.block_lists)
    swap = BlockSwap(blocks, 1, torch.device("cpu"))
    for handle in swap.handles:  # no hooks: nothing onloads block 0
        handle.remove()
    with pytest.raises(RuntimeError):  # the forward multiplies by an empty placeholder
        _train(family, pipe, denoisers, experts, steps=1)


@pytest.fixture(scope="module")
def deep_wan(tmp_path_factory):
    """The tiny Wan with six blocks (only the depth changed): enough swapped blocks for the resident bound to bite."""
    from diffusers import WanTransformer3DModel

    folder = build_tiny("wan", tmp_path_factory.mktemp("deep-wan") / "model")
    torch.manual_seed(0)
    config = dict(WanTransformer3DModel.load_config(folder / "transformer"), num_layers=6)
    WanTransformer3DModel.from_config(config).save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_swapped_blocks_visit_in_order_and_two_at_most_are_resident(deep_wan, checkpointing):
    family = get_family("wan")
    reference = _train(family, *_lora_pipeline(family, deep_wan, checkpointing), steps=2)
    pipe, denoisers, experts = _lora_pipeline(family, deep_wan, checkpointing)
    swap = BlockSwap(transformer_blocks(denoisers[0], family.block_lists), 4, torch.device("cpu"))
    swapped = _train(family, pipe, denoisers, experts, steps=2)
    assert swapped[0] == pytest.approx(reference[0], rel=1e-6)
    assert swap.resident_peak == 1 + PREFETCH
    # Each step (two forwards, one backward): forward loads 0..3 in order (each one ahead of its use), the backward
    # reloads 3..1 in reverse and keeps 0 for the next forward.
    loads = [i for kind, i in swap.events if kind == "load"]
    assert loads[:8] == [0, 1, 2, 3, 0, 1, 2, 3] and loads[8:11] == [3, 2, 1]
    # A forward evicts each block as it ends, the last swapped one too (the unswapped blocks compute without it).
    assert swap.events[:8] == [("load", 0), ("load", 1), ("evict", 0), ("load", 2), ("evict", 1)] + [
        ("load", 3),
        ("evict", 2),
        ("evict", 3),
    ]
