"""Wan image-to-video (`wan-i2v`) beyond the shared family suite: what training feeds the transformer is what
WanImageToVideoPipeline feeds it for the same first frame (Wan 2.1's CLIP tokens and channel concat, Wan 2.2
I2V-A14B's concat, TI2V-5B's first-frame replacement), the conditioning is cached beside the latents and trains a
LoRA that loads back, and a text-to-video checkpoint is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.test_families import _image, _render
from tests.test_wan22 import _job, tiny  # noqa: F401 (the module's tiny-model fixture)
from vidtune.training.adapters import load_adapter
from vidtune.training.cache import PrecomputeParams, _skip_reason, frame_buckets, load_cache_entry, precompute
from vidtune.training.data import cache_shards, make_stream
from vidtune.training.families import get_family
from vidtune.training.trainer import Trainer, batch_loss

I2V = get_family("wan-i2v")
PROMPT = "a red car in sks style"


def _clip(image: Image.Image, frames: int = 9, seed: int = 0) -> torch.Tensor:
    """A clip (1, 3, frames, h, w) in [-1, 1] whose first frame is `image` and whose other frames are noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, image.height, image.width, 3), dtype=np.uint8)
    pixels[0] = np.asarray(image)
    return torch.from_numpy(pixels).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0


def _record_transformer_inputs(pipe) -> list[dict]:
    """Every expert's forward keyword arguments, recorded as they arrive."""
    calls = []
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).register_forward_pre_hook(
                lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
            )
    return calls


def _sample(pipe, image: Image.Image, output_type="np"):
    """One denoising step from fixed noise, at the image's (square) size."""
    return _render(pipe, I2V, image, size=image.width, steps=1, output_type=output_type)


@pytest.mark.parametrize("variant", ["wan-i2v", "wan2.2-i2v-a14b"])
def test_training_conditions_the_transformer_as_the_pipeline_does(tiny, variant):  # noqa: F811
    """Channel concat: for a clip whose first frame is the image, the 20 conditioning channels (mask, latents of the
    image followed by grey frames), the CLIP image tokens (Wan 2.1) and the 512 text tokens that training gives the
    transformer are the ones the pipeline gives it; the first 16 channels are the training noise."""
    pipe = I2V.load_pipeline(tiny(variant))
    image = _image(0, size=32)
    calls = _record_transformer_inputs(pipe)
    _sample(pipe, image)
    sampled = calls[0]
    video = _clip(image)
    latents = I2V.sample_latents(pipe, I2V.encode_video(pipe, video), torch.Generator().manual_seed(0))
    inputs = I2V.objective(pipe).inputs(latents, torch.Generator().manual_seed(0))
    inputs = replace(inputs, condition=I2V.encode_condition(pipe, video))
    calls.clear()
    I2V.predict(pipe, inputs, I2V.encode_prompts(pipe, [PROMPT]))
    trained = calls[0]

    assert trained["hidden_states"].shape == sampled["hidden_states"].shape == (1, 36, 3, 4, 4)
    assert torch.allclose(trained["hidden_states"][:, 16:], sampled["hidden_states"][:, 16:], atol=1e-5)
    assert torch.equal(trained["hidden_states"][:, :16], inputs.noisy)
    assert torch.equal(trained["hidden_states"][:, 16:20, 0], torch.ones(1, 4, 4, 4))  # the mask marks frame 0 only
    assert not trained["hidden_states"][:, 16:20, 1:].any()
    assert trained["encoder_hidden_states"].shape[1] == 512  # Wan 2.1 splits image tokens off at 512 from the end
    assert torch.allclose(trained["encoder_hidden_states"], sampled["encoder_hidden_states"], atol=1e-6)
    if variant == "wan-i2v":  # Wan 2.1: the image encoder's penultimate layer, all 257 tokens of ViT-H/14 at 224 px
        assert trained["encoder_hidden_states_image"].shape == (1, 257, 32)
        assert torch.allclose(trained["encoder_hidden_states_image"], sampled["encoder_hidden_states_image"], atol=1e-5)
    else:  # Wan 2.2 I2V-A14B has no image branch
        assert trained["encoder_hidden_states_image"] is None and sampled["encoder_hidden_states_image"] is None
    assert inputs.loss_mask is None  # every latent frame is denoised, so every frame is scored

    other = I2V.encode_condition(pipe, _clip(_image(1, size=32)))  # the check tells images apart
    assert (other["latent_condition"] - inputs.condition["latent_condition"]).abs().max() > 1e-2


def test_the_5b_conditions_on_the_clean_first_latent_frame_at_timestep_zero(tiny):  # noqa: F811
    """TI2V-5B (index: WanPipeline, `expand_timesteps`) trained with `family: wan-i2v`: latent frame 0 is the image's
    latent in training as in sampling, its tokens get timestep 0 in both, the loss leaves it out, and the sampled
    video's first latent frame is the image's."""
    model = tiny("wan2.2-ti2v-5b")
    pipe = I2V.load_pipeline(model)
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.expand_timesteps
    image = _image(0, size=64)
    calls = _record_transformer_inputs(pipe)
    generated = _sample(pipe, image, output_type="latent")
    sampled = calls[0]
    video = _clip(image)
    inputs = I2V.objective(pipe).inputs(
        I2V.sample_latents(pipe, I2V.encode_video(pipe, video), torch.Generator().manual_seed(0)),
        torch.Generator().manual_seed(0),
    )
    calls.clear()
    I2V.predict(pipe, inputs, I2V.encode_prompts(pipe, [PROMPT]))
    trained = calls[0]

    assert trained["hidden_states"].shape == sampled["hidden_states"].shape == (1, 48, 3, 4, 4)
    image_latent = sampled["hidden_states"][:, :, :1]
    assert torch.allclose(trained["hidden_states"][:, :, :1], image_latent, atol=1e-5)
    assert torch.allclose(generated[:, :, :1], image_latent, atol=1e-5)  # put back after sampling
    tokens_per_frame = (4 // 2) * (4 // 2)
    assert torch.equal(trained["timestep"] == 0, sampled["timestep"] == 0)  # per token: 0 on frame 0 only
    assert not trained["timestep"][:, :tokens_per_frame].any() and trained["timestep"][:, tokens_per_frame:].all()
    assert inputs.loss_mask[:, :, 0].eq(0).all() and inputs.loss_mask[:, :, 1:].eq(1).all()
    assert I2V.encode_condition(pipe, video) == {}  # the cached clip latents hold the image's


def test_a_wan_the_family_cannot_train_is_refused_naming_the_model(tiny, tmp_path):  # noqa: F811
    """A text-to-video Wan named as wan-i2v, an image-to-video one named as wan, and a first-last-frame one (FLF2V,
    which the I2V pipeline class loads too) by either: said before any weights load, not as a shape error."""
    with pytest.raises(
        ValueError, match=r"model: .* is a text-to-video Wan .*16 channels.*or train it with family wan"
    ):
        I2V.check_model(tiny("wan"))
    with pytest.raises(ValueError, match=r"model: .* is an image-to-video Wan .*36 channels.*family wan-i2v"):
        get_family("wan").check_model(tiny("wan-i2v"))
    I2V.check_model(tiny("wan2.2-ti2v-5b"))
    I2V.check_model(tiny("wan-i2v"))
    get_family("wan").check_model(tiny("wan2.2-ti2v-5b"))
    flf2v = shutil.copytree(tiny("wan-i2v"), tmp_path / "flf2v")
    config = json.loads((flf2v / "transformer" / "config.json").read_text())
    (flf2v / "transformer" / "config.json").write_text(json.dumps({**config, "pos_embed_seq_len": 514}))
    for family in (I2V, get_family("wan")):
        with pytest.raises(ValueError, match=r"model: .* is a first-last-frame Wan \(FLF2V.*first frame only"):
            family.check_model(str(flf2v))
    assert not I2V.valid_num_frames(1) and I2V.valid_num_frames(9)  # a still would be its own condition
    buckets = frame_buckets(I2V, PrecomputeParams())
    assert 1 not in buckets and _skip_reason(1, buckets, I2V) == (
        "stills: Wan image-to-video trains on no single frame (a still is its own conditioning image)"
    )


@pytest.mark.parametrize("variant", ["wan-i2v", "wan2.2-ti2v-5b"])
def test_conditioning_is_cached_beside_the_latents_and_a_lora_trains_from_it(curated, tiny, tmp_path, variant):  # noqa: F811
    """precompute stores Wan 2.1 I2V's first-frame latents and CLIP tokens (nothing for the 5B, whose conditioning
    frame is in the clip latents); the cached batch's loss equals the loss on the fly from the same clip; a LoRA
    trained from the cache renders validation samples from an image and loads back into a fresh pipeline."""
    output, _, _ = curated
    model = tiny(variant)
    pipe = I2V.load_pipeline(model)
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))[:1]
    result = precompute(shards, I2V, pipe, model, tmp_path / "cache", PrecomputeParams(frame_buckets=[9]))
    cached = cache_shards(result.cache_dir)
    entry = load_cache_entry(next(iter(wds.WebDataset(cached, shardshuffle=False))))
    latent_frames, height, width = entry["latents"].shape[1:]
    if variant == "wan-i2v":
        assert entry["condition"]["latent_condition"].shape == (16, latent_frames, height, width)
        assert entry["condition"]["image_embeds"].shape == (257, 32)
    else:
        assert entry["condition"] == {}

    from_cache = next(iter(make_stream("cache", cached, [9], batch_size=1, seed=0)))
    on_the_fly = next(
        batch
        for batch in make_stream("shards", shards, [9], batch_size=1, seed=0)
        if batch["clip_ids"] == from_cache["clip_ids"]
    )
    losses = []
    for batch in (from_cache, on_the_fly):
        torch.manual_seed(0)
        losses.append(batch_loss(I2V, pipe, None, batch, torch.float32).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)

    image = tmp_path / "first.png"
    _image(0, size=32).save(image)
    validation = {"prompts": ["a red car"], "images": [str(image)], "every": 2, "inference_steps": 2}
    job = _job(model, cached, tmp_path / "run", max_steps=2, validation=validation).model_copy(
        update={"family": "wan-i2v"}
    )
    trainer = Trainer(job)
    trained = trainer.run()
    assert trained.steps == 2 and all(np.isfinite(trained.losses))
    assert (tmp_path / "run" / "samples" / "step-000002" / "sample-00.mp4").stat().st_size > 0
    fresh = I2V.load_pipeline(model)
    base = _sample(fresh, Image.open(image))
    assert load_adapter(fresh, trained.weights) == ["transformer"]
    loaded, reference = _sample(fresh, Image.open(image)), _sample(trainer.pipe, Image.open(image))
    assert np.abs(loaded - reference).max() < 1e-4 and np.abs(loaded - base).max() > 1e-5
