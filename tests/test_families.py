"""The shared family suite, run over every registered family: tiny build -> from_pretrained -> encode a clip ->
finite loss -> LoRA steps lower the loss on a fixed batch -> save_lora_weights -> a fresh pipeline loads it and
generates what the trained model generates (and not what the base does); the same for a full fine-tune."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vidtune.training.cache import _text_tensors, padded_text
from vidtune.training.families import FAMILIES, ModelFamily, TextEmbeddings, detect_family, get_family
from vidtune.training.families.objectives import denoising_loss
from vidtune.training.tiny_models import TINY_MODELS, build_tiny


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family_model(request, tmp_path_factory):
    """Every family, each built from its published checkpoint's configs (Wan twice: 1.3B and 14B)."""
    name = request.param
    folder = build_tiny(name, tmp_path_factory.mktemp(name) / "model")
    return TINY_MODELS[name], folder


FRAMES = 9  # valid for every family: 4k+1 (Wan, CogVideoX) and 8k+1 (LTX); CogVideoX needs an odd latent count


def _video(frames=FRAMES, size=32, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-1, 1, (1, 3, frames, size, size)).astype(np.float32))


def _image(seed=0, size=32):
    """A conditioning image for image-to-video families: smooth colour ramps, which even a tiny VAE keeps apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = low + (high - low) * (ramp[:, None, None] + ramp[None, :, None]) / 2
    return Image.fromarray(pixels.astype(np.uint8))


def _conditioned(family: ModelFamily, pipe, inputs, video: torch.Tensor):
    """`inputs` with what the family conditions on besides the clip's latents (Wan image-to-video: the latents of
    its first frame and grey frames, and CLIP image tokens), as precompute caches it."""
    return replace(inputs, condition=family.encode_condition(pipe, video))


def _render(pipe, family: ModelFamily, image=None, size=32, steps=2, output_type="np"):
    """`steps` denoising steps from fixed noise: equal weights give (nearly) equal videos. An image-to-video family
    renders from `_image()` unless given another image."""
    if family.image_conditioned and image is None:
        image = _image()
    return pipe(
        prompt="a red car in sks style",
        num_frames=FRAMES,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=1.0,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **family.sampling_arguments(image),
    ).frames


def _assert_loaded_weights_are_the_trained_ones(trained: np.ndarray, loaded: np.ndarray, base: np.ndarray) -> None:
    assert loaded.shape == (1, FRAMES, 32, 32, 3) and np.isfinite(loaded).all()
    assert np.abs(loaded - trained).max() < 1e-4  # what the trained model makes
    assert np.abs(loaded - base).max() > 1e-3  # and not what the base makes: the weights were applied


def test_every_family_has_a_tiny_model_named_after_it():
    assert all(family.name in family.tiny_models for family in FAMILIES.values())


def test_family_is_detected_from_model_index(family_model):
    family, folder = family_model
    assert detect_family(folder) is family


def test_lora_training_lowers_the_loss_and_the_adapter_loads_into_a_fresh_pipeline(family_model, tmp_path):
    """For a two-expert model (Wan 2.2 A14B) each expert trains its own LoRA on its own noise levels, the family's
    prediction routes each batch to the expert WanPipeline would use, and each saved file changes the output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from vidtune.training.adapters import adapter_file
    from vidtune.training.experts import model_experts

    family, folder = family_model
    torch.manual_seed(0)
    pipe = family.load_pipeline(str(folder))
    moments = family.encode_video(pipe, _video())
    text = family.encode_prompts(pipe, ["a red car in sks style"])

    experts = model_experts(pipe, family.denoiser_name, None)
    denoisers = {expert.module: getattr(pipe, expert.module) for expert in experts}
    for denoiser in denoisers.values():
        denoiser.requires_grad_(False)
        denoiser.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, target_modules=list(family.default_lora_targets), init_lora_weights="gaussian"
            )
        )
    params = [p for d in denoisers.values() for p in d.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    latents = family.sample_latents(pipe, moments, generator)
    # posterior moments (mean, logvar), not one sample; or the mean, where the family trains on it
    assert moments.shape[1] == (2 if family.caches_posterior else 1) * latents.shape[1]
    objective = family.objective(pipe)
    batches = [  # fixed batches, one per expert in its own range: the loss must go down on them
        _conditioned(
            family,
            pipe,
            objective.inputs(latents, generator, within=(e.low, e.high))
            if len(experts) > 1
            else objective.inputs(latents, generator),
            _video(),
        )
        for e in experts
    ]

    def loss_fn():
        return sum(denoising_loss(family.predict(pipe, batch, text), batch) for batch in batches)

    losses = []
    for _ in range(8):
        loss = loss_fn()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert loss_fn().item() < losses[0]
    for denoiser in denoisers.values():  # every expert's LoRA trained
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.parameters() if p.requires_grad)

    for module, denoiser in denoisers.items():
        type(pipe).save_lora_weights(
            tmp_path / "lora",
            weight_name=adapter_file(module, family.denoiser_name),
            **{f"{family.denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser)},
        )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    trained = _render(pipe, family)
    fresh = family.load_pipeline(str(folder))
    base = _render(fresh, family)
    fresh.load_lora_weights(tmp_path / "lora")
    if len(experts) > 1:  # the low-noise expert's file, loaded as diffusers loads a Wan 2.2 LoRA into transformer_2
        high_only = _render(fresh, family)
        assert np.abs(high_only - trained).max() > 1e-3 and np.abs(high_only - base).max() > 1e-3
        fresh.load_lora_weights(
            tmp_path / "lora", weight_name=adapter_file("transformer_2", "transformer"), load_into_transformer_2=True
        )
    _assert_loaded_weights_are_the_trained_ones(trained, _render(fresh, family), base)


def test_prediction_from_cached_embeddings_needs_no_text_encoder(family_model):
    """What a cached run does: prompts embedded once, then a pipeline loaded without its text encoder(s) predicts."""
    family, folder = family_model
    text = family.encode_prompts(family.load_pipeline(str(folder)), ["a red car in sks style"])
    pipe = family.load_pipeline(str(folder), **dict.fromkeys(family.text_encoders))
    assert all(getattr(pipe, name) is None for name in family.text_encoders)
    generator = torch.Generator().manual_seed(0)
    for frames in (FRAMES, 1) if family.valid_num_frames(1) else (FRAMES,):  # 1: a still (a curated image)
        latents = family.sample_latents(pipe, family.encode_video(pipe, _video(frames)), generator)
        inputs = _conditioned(family, pipe, family.objective(pipe).inputs(latents, generator), _video(frames))
        pred = family.predict(pipe, inputs, text)
        assert pred.shape == latents.shape and torch.isfinite(pred).all(), frames

    # The cache keeps the prompt up to its last real token and pads it back when read: the denoiser sees the same.
    stored = _text_tensors(text)
    padded = padded_text(stored)
    assert (stored["embeds"].shape[0] < stored["tokens"]) == (family.name in CUT_PROMPTS)
    cached = TextEmbeddings(*(padded[n].unsqueeze(0) if n in padded else None for n in ("embeds", "mask", "pooled")))
    assert cached.embeds.shape == text.embeds.shape
    if text.mask is None:  # the padding was zeros: the same numbers
        assert torch.equal(cached.embeds, text.embeds) and torch.equal(family.predict(pipe, inputs, cached), pred)
    else:  # the padding was masked out: what it held is not attended to
        assert torch.equal(cached.mask, text.mask)
        assert torch.allclose(family.predict(pipe, inputs, cached), pred, atol=1e-6, rtol=1e-5)


# Families whose prompt padding the cache cuts: zeros (Wan's pipelines pad so) or masked out (LTX-Video's,
# HunyuanVideo's); CogVideoX's and CLIP's (AnimateDiff) pad tokens are encoded and attended to, and kept.
CUT_PROMPTS = {"wan", "wan-i2v", "ltx-video", "ltx-video-i2v", "hunyuan-video"}


def test_valid_frame_counts(family_model):
    from vidtune.training.cache import PrecomputeParams, frame_buckets

    family, _ = family_model
    assert family.valid_num_frames(FRAMES) and not family.valid_num_frames(0) and not family.valid_num_frames(1000)
    assert all(family.valid_num_frames(frames) for frames in family.frame_buckets)  # none silently dropped
    stills = [1] if family.valid_num_frames(1) else []  # the bucket curated images train in
    assert frame_buckets(family, PrecomputeParams()) == sorted([*stills, *family.frame_buckets])
    if family.name == "wan":
        assert family.valid_num_frames(81)  # Wan's published clip length, its longest default bucket
    if family.name in ("wan", "cogvideox", "ltx-video"):  # temporally compressed: only 4k+1 / 8k+1 counts
        assert not family.valid_num_frames(6)


def test_unknown_family_and_non_diffusers_folder(tmp_path):
    with pytest.raises(
        ValueError,
        match="unknown model family 'sora'; supported: animatediff, animatediff-sdxl, cogvideox, hunyuan-video, ltx-video, ltx-video-i2v, wan, wan-i2v",
    ):
        get_family("sora")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        detect_family(tmp_path)


def test_full_finetune_of_a_parameter_subset_lowers_the_loss_and_reloads(family_model, tmp_path):
    from vidtune.training.trainable import select_trainable

    family, folder = family_model
    torch.manual_seed(0)
    pipe = family.load_pipeline(str(folder))
    text = family.encode_prompts(pipe, ["a red car in sks style"])
    generator = torch.Generator().manual_seed(1)
    video = _video(seed=1)
    batch = family.objective(pipe).inputs(
        family.sample_latents(pipe, family.encode_video(pipe, video), generator), generator
    )
    batch = _conditioned(family, pipe, batch, video)
    subset_name, pattern = next(iter(family.full_subsets.items()))
    denoiser = getattr(pipe, family.denoiser_name)
    params = select_trainable(denoiser, pattern)
    frozen = {n: p.detach().clone() for n, p in denoiser.named_parameters() if not p.requires_grad}
    assert 0 < sum(p.numel() for p in params) < sum(p.numel() for p in denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def loss_fn():
        return denoising_loss(family.predict(pipe, batch, text, denoiser), batch)

    first = loss_fn().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    assert loss_fn().item() < first, subset_name
    assert all(torch.equal(p, frozen[n]) for n, p in denoiser.named_parameters() if n in frozen)

    denoiser.save_pretrained(tmp_path / "denoiser")
    trained = _render(pipe, family)
    fresh = family.load_pipeline(str(folder))
    base = _render(fresh, family)
    setattr(fresh, family.denoiser_name, type(denoiser).from_pretrained(tmp_path / "denoiser"))
    _assert_loaded_weights_are_the_trained_ones(trained, _render(fresh, family), base)


def test_select_trainable_names_an_example_when_nothing_matches():
    with pytest.raises(ValueError, match="no parameter name matches 'nothing'"):
        from vidtune.training.trainable import select_trainable

        select_trainable(torch.nn.Linear(2, 2), "nothing")


def test_a_family_missing_a_member_or_with_an_invalid_bucket_is_refused_when_defined():
    from vidtune.training.families.wan import WanFamily

    with pytest.raises(TypeError, match="does not set title, frame_buckets"):
        type(
            "Half",
            (ModelFamily,),
            {
                "name": "half",
                "pipeline_class_name": "X",
                "objective_kind": "flow",
                "full_subsets": {},
                "tiny_models": {},
                **{m: WanFamily.__dict__[m] for m in ("encode_prompts", "sample_latents", "objective", "predict")},
            },
        )
    with pytest.raises(TypeError, match=r"frame_buckets \[80\] are not frame counts"):
        type("Odd", (WanFamily,), {"name": "odd", "frame_buckets": (81, 80)})
