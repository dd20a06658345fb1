"""Wan 2.2 as configurations of the Wan family, trained on real curated clips: TI2V-5B (48-channel VAE with 16x
spatial compression, per-token timesteps) and T2V-A14B's two experts (`experts`: which one trains, on which
timesteps, and the two LoRA files that load back into a fresh pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_families import _render as _render_family
from vidtune.evaluation.pyfunc import build_pipeline
from vidtune.training.adapters import ADAPTER_FILE, comfyui_file, load_adapter
from vidtune.training.cache import PrecomputeParams, precompute
from vidtune.training.data import cache_shards, make_stream
from vidtune.training.experts import ADAPTER_FILES, check_experts
from vidtune.training.families import get_family, model_index
from vidtune.training.job import TrainJob
from vidtune.training.params import TrainParams
from vidtune.training.tiny_models import build_tiny
from vidtune.training.trainer import Trainer

SECOND_FILE = ADAPTER_FILES["transformer_2"]
BOUNDARY = 875  # the published T2V-A14B boundary_ratio 0.875 x 1000 timesteps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Built once per module: `tiny("wan2.2-t2v-a14b")` -> the model folder."""
    built = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(build_tiny(name, tmp_path_factory.mktemp(name) / "model"))
        return built[name]

    return get


def _cache(curated, model: str, folder) -> list[str]:
    output, _, _ = curated
    family = get_family("wan")
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))[:1]
    result = precompute(shards, family, family.load_pipeline(model), model, folder, PrecomputeParams(frame_buckets=[9]))
    return cache_shards(result.cache_dir)


def _job(model: str, shards: list[str], out, tracking=None, **params) -> TrainJob:
    values = {"rank": 4, "learning_rate": 1e-3, "mixed_precision": "no", "max_steps": 4, "checkpoint_every": 2}
    return TrainJob(
        model=model,
        family="wan",
        out=str(out),
        shards=shards,
        frame_buckets=[9],
        sample_size=(9, 32, 32),
        params=TrainParams(**{**values, **params}),
        tracking_uri=f"sqlite:///{tracking or out}.mlflow.db",
    )


class ObservedTrainer(Trainer):
    """The trainer, recording the timesteps each expert is given in training forward passes (with gradients on;
    validation samples render without)."""

    def setup(self) -> None:
        super().setup()
        self.seen = {"transformer": [], "transformer_2": []}
        for name, timesteps in self.seen.items():
            module = getattr(self.pipe, name)

            def record(module, args, kwargs, timesteps=timesteps):
                if torch.is_grad_enabled():
                    timesteps.extend(kwargs["timestep"].flatten().tolist())

            module.register_forward_pre_hook(record, with_kwargs=True)


def _render(pipe) -> np.ndarray:
    return _render_family(pipe, get_family("wan"))


def test_the_5b_refuses_clip_sizes_its_vae_and_patches_do_not_divide_naming_the_setting(tiny):
    family, five_b = get_family("wan"), tiny("wan2.2-ti2v-5b")
    family.check_clip_size(five_b, 9, 64, 96)  # multiples of 32 (16x VAE, 2x2 patches)
    with pytest.raises(ValueError, match=r"clips.width: 48 pixels is not a multiple of 32 .*--set clips.buckets="):
        family.check_clip_size(five_b, 9, 64, 48)
    with pytest.raises(ValueError, match=r"clips.height: 80 pixels is not a multiple of 32"):
        family.check_clip_size(five_b, 9, 80, 64)
    family.check_clip_size(tiny("wan2.2-t2v-a14b"), 9, 48, 48)  # the A14B's VAE is Wan 2.1's: 8x, so 16


def test_the_5b_trains_from_the_cache_renders_samples_and_its_lora_loads(curated, tiny, tmp_path):
    model = tiny("wan2.2-ti2v-5b")
    shards = _cache(curated, model, tmp_path / "cache")
    latents = next(iter(make_stream("cache", shards, [9], batch_size=1, seed=0)))["latents"]
    assert latents.shape == (1, 48, 3, 4, 4)  # the 48-channel posterior mean, 9 frames / 4, 64 px / 16
    validation = {"prompts": ["a red car"], "every": 4, "inference_steps": 2}
    trainer = Trainer(_job(model, shards, tmp_path / "run", learning_rate=5e-3, validation=validation))
    result = trainer.run()
    assert result.steps == 4 and all(np.isfinite(result.losses))
    assert (tmp_path / "run" / "samples" / "step-000004" / "sample-00.mp4").stat().st_size > 0
    assert not (result.weights / SECOND_FILE).exists()
    fresh = get_family("wan").load_pipeline(model)
    base = _render(fresh)
    assert load_adapter(fresh, result.weights) == ["transformer"]
    trained, loaded = _render(trainer.pipe), _render(fresh)
    assert np.abs(loaded - trained).max() < 1e-4 and np.abs(loaded - base).max() > 1e-4


@pytest.fixture(scope="module")
def a14b(curated, tiny, tmp_path_factory):
    model = tiny("wan2.2-t2v-a14b")
    return model, _cache(curated, model, tmp_path_factory.mktemp("a14b-cache"))


@pytest.mark.parametrize(
    "experts, trained, idle", [("high", "transformer", "transformer_2"), ("low", "transformer_2", "transformer")]
)
def test_one_expert_trains_on_its_own_timesteps_and_only_its_weights_change(a14b, tmp_path, experts, trained, idle):
    model, shards = a14b
    validation = {"prompts": ["a red car"], "every": 4, "inference_steps": 2}  # the idle expert serves samples
    trainer = ObservedTrainer(_job(model, shards, tmp_path / "run", experts=experts, validation=validation))
    result = trainer.run()
    assert (tmp_path / "run" / "samples" / "step-000004" / "sample-00.mp4").stat().st_size > 0
    seen = trainer.seen[trained]
    assert len(seen) == 4 and not trainer.seen[idle]  # one forward per step, all by the trained expert
    assert all(t >= BOUNDARY for t in seen) if experts == "high" else all(t < BOUNDARY for t in seen), seen
    expected = ADAPTER_FILE if trained == "transformer" else SECOND_FILE
    assert {p.name for p in result.weights.glob("pytorch_lora_weights*.safetensors")} == {expected}
    assert (result.weights / comfyui_file(trained, "transformer")).is_file()  # ComfyUI: one file per expert
    lora = load_file(result.weights / expected)
    assert all(k.startswith("transformer.") for k in lora)  # diffusers' key prefix for either expert
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained: B starts at zero
    assert not getattr(getattr(trainer.pipe, idle), "_hf_peft_config_loaded", False)  # no adapter on the other
    assert json.loads((result.weights / "vidtune.json").read_text())["adapter_files"] == {trained: expected}


def test_both_experts_train_their_own_lora_resume_exactly_and_load_back(a14b, tmp_path):
    model, shards = a14b
    settings = {"experts": "both", "timestep_sampling": "uniform", "min_timestep": 750, "max_steps": 6}
    trainer = ObservedTrainer(_job(model, shards, tmp_path / "full", **settings))
    full = trainer.run()
    high, low = trainer.seen["transformer"], trainer.seen["transformer_2"]
    assert high and low and len(high) + len(low) == 6, (high, low)  # each step trained one expert
    assert all(t >= BOUNDARY for t in high) and all(750 <= t < BOUNDARY for t in low), (high, low)
    for file in (ADAPTER_FILE, SECOND_FILE):
        assert any(v.abs().sum() > 0 for k, v in load_file(full.weights / file).items() if "lora_B" in k), file

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    (full.checkpoints[0]).rename(resumed_dir / "checkpoints" / full.checkpoints[0].name)  # step 2
    resumed = Trainer(_job(model, shards, resumed_dir, tmp_path / "full", resume="latest", **settings)).run()
    assert resumed.losses[2:] == pytest.approx(full.losses[2:], abs=1e-5)
    for file in (ADAPTER_FILE, SECOND_FILE):
        got, want = load_file(resumed.weights / file), load_file(full.weights / file)
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)

    # What `vidtune generate` and the MLflow pyfunc build: the base model plus both files, at a LoRA scale.
    config = {"family": "wan", "base_model": model}
    base = _render(get_family("wan").load_pipeline(model))
    loaded = _render(build_pipeline(config, {"adapter": str(full.weights)}, device="cpu"))
    assert np.abs(loaded - _render(trainer.pipe)).max() < 1e-4 and np.abs(loaded - base).max() > 1e-4
    off = _render(build_pipeline(config, {"adapter": str(full.weights)}, device="cpu", lora_scale=0.0))
    assert np.abs(off - base).max() < 1e-4  # the scale reaches both experts


def test_experts_is_refused_for_a_model_with_one_denoiser(tiny):
    five_b = tiny("wan2.2-ti2v-5b")
    with pytest.raises(ValueError, match=r"experts: .* has one denoiser; .*leave experts unset"):
        check_experts("high", model_index(five_b), five_b)
    check_experts("low", model_index(tiny("wan2.2-t2v-a14b")), "a14b")


def test_an_expert_range_outside_min_and_max_timestep_and_full_training_are_refused(a14b, tmp_path):
    model, shards = a14b
    with pytest.raises(ValueError, match=r"min_timestep/max_timestep: 0-800 leaves the transformer expert"):
        Trainer(_job(model, shards, tmp_path / "run", experts="high", max_timestep=800)).run()
    with pytest.raises(ValueError, match=r"training_type: full fine-tuning of a two-expert model .* use lora"):
        Trainer(_job(model, shards, tmp_path / "full", training_type="full", rank=32)).run()


def test_an_expert_draws_only_its_noise_levels_recovered_from_the_training_inputs(tiny):
    """With clean latents of zero, noisy = s * noise and target = noise: the level s is read off the tensors."""
    family = get_family("wan")
    objective = family.objective(family.load_pipeline(tiny("wan2.2-t2v-a14b")))
    zeros = torch.zeros(64, 16, 1, 2, 2)
    for within in ((0.875, 1.0), (0.0, 0.875)):
        inputs = objective.inputs(zeros, torch.Generator().manual_seed(0), within=within)
        levels = (inputs.noisy / inputs.target).flatten(1)
        assert torch.allclose(levels, levels[:, :1].expand_as(levels), atol=1e-5)  # one level per sample
        level = levels[:, 0]
        assert ((level >= within[0]) & (level <= within[1])).all(), level
        assert torch.allclose(inputs.timesteps, level * 1000, atol=1e-3)
    unrestricted = objective.inputs(zeros, torch.Generator().manual_seed(0))
    drawn = (unrestricted.noisy / unrestricted.target)[:, 0, 0, 0, 0]
    assert (drawn < 0.875).any() and (drawn >= 0.875).any()  # without a range, both experts' levels occur
