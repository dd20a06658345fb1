"""Training objectives under every scheduler the published checkpoints of each family ship.

The mixing coefficients are recovered from the returned tensors (two calls with the same seed on x and 2x: the
noise is the same, so what changes is the signal's share), and checked against the parameterisation the model was
trained with; the expected VP noise levels are computed here from the published betas, not read from the code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vidtune.training.families import get_family
from vidtune.training.families.objectives import ObjectiveParams, check_objective_params
from vidtune.training.published_configs import published_scheduler, published_scheduler_config

FLOW_CHECKPOINTS = {  # family -> repos whose scheduler_config.json is stored in training/model_configs
    "wan": ["Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"],
    "ltx-video": ["Lightricks/LTX-Video"],
    "hunyuan-video": ["hunyuanvideo-community/HunyuanVideo"],
}
VP_CHECKPOINTS = {
    "cogvideox": ["THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b"],
    # SD 1.5 ships PNDM; diffusers' AnimateDiff docs configure DDIM with linear betas; Lightning ships Euler, AnimateLCM LCM
    "animatediff": [
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "_derived/animatediff-docs-ddim-sd15",
        "ByteDance/AnimateDiff-Lightning",
        "wangfuyun/AnimateLCM",
    ],
    "animatediff-sdxl": ["stabilityai/stable-diffusion-xl-base-1.0", "_derived/animatediff-docs-ddim-sdxl"],
}
FLOW_CASES = [(family, repo) for family, repos in FLOW_CHECKPOINTS.items() for repo in repos]
VP_CASES = [(family, repo) for family, repos in VP_CHECKPOINTS.items() for repo in repos]
LATENT_SHAPE = (4, 4, 3, 32, 32)  # batch of 4; 12k values per sample, so the noise's std is known to ~1%


def _pipe(repo: str):
    """What a family reads to build its objective: the scheduler (as from_pretrained builds it) and patch sizes."""
    return SimpleNamespace(
        scheduler=published_scheduler(repo), transformer_temporal_patch_size=1, transformer_spatial_patch_size=1
    )


def _latents(seed: int = 0) -> torch.Tensor:
    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return latents + 0.5 * latents.sign()  # bounded away from 0: coefficients are recovered by dividing by it


def _coefficients(objective, seed: int = 3):
    """Per sample: noisy = A x + B n, target = C x + D n. A, C from x vs 2x with the same seed; B/D from the
    parts left; D is pinned by the noise being standard normal (its std is 1 within ~1%)."""
    x = _latents()
    first, second = (
        objective.inputs(x, torch.Generator().manual_seed(seed)),
        objective.inputs(2 * x, torch.Generator().manual_seed(seed)),
    )
    assert torch.equal(first.timesteps, second.timesteps)
    per_sample = lambda t: t.flatten(1).mean(1)  # noqa: E731
    a, c = per_sample((second.noisy - first.noisy) / x), per_sample((second.target - first.target) / x)
    noise_in_noisy = first.noisy - a.view(-1, 1, 1, 1, 1) * x
    noise_in_target = first.target - c.view(-1, 1, 1, 1, 1) * x
    d = noise_in_target.flatten(1).std(1)
    b = per_sample(noise_in_noisy / noise_in_target) * d
    return first, a, b, c, d


@pytest.mark.parametrize(("family_name", "repo"), FLOW_CASES)
def test_flow_inputs_are_rectified_flow_whatever_sampler_the_checkpoint_ships(family_name, repo):
    objective = get_family(family_name).objective(_pipe(repo), ObjectiveParams())
    inputs, a, b, c, d = _coefficients(objective)
    s = inputs.timesteps.double() / 1000  # timestep = 1000 s
    assert ((s >= 0) & (s <= 1)).all(), f"sigmas outside [0, 1]: {s.tolist()}"
    assert torch.allclose(a, 1 - s, atol=1e-9)  # noisy = (1 - s) x + s n
    assert torch.allclose(b, s, rtol=0.03)
    assert torch.allclose(c, torch.full_like(c, -1.0), atol=1e-9)  # target = n - x
    assert torch.allclose(d, torch.ones_like(d), rtol=0.03)


def _published_alphas_cumprod(config: dict) -> np.ndarray:
    """The checkpoint's training noise levels from its betas, written here from the papers' formulas."""
    steps = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    else:
        raise AssertionError(f"no reference formula for beta_schedule={schedule}")
    betas = betas.astype(np.float32).astype(np.float64)  # schedulers hold betas in float32
    alpha_bar = np.cumprod(1 - betas)
    shift = config.get("snr_shift_scale", 1.0)  # CogVideoX: SNR divided by the scale
    alpha_bar = alpha_bar / (shift + (1 - shift) * alpha_bar)
    if config.get("rescale_betas_zero_snr"):  # Lin et al. 2023: shift and scale sqrt(abar) so the last is 0
        root = np.sqrt(alpha_bar)
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        alpha_bar = root**2
    return alpha_bar


@pytest.mark.parametrize(("family_name", "repo"), VP_CASES)
def test_vp_inputs_follow_the_published_betas_whatever_sampler_the_checkpoint_ships(family_name, repo):
    family = get_family(family_name)
    config = published_scheduler_config(repo)
    objective = family.objective(_pipe(repo), ObjectiveParams())
    inputs, a, b, c, d = _coefficients(objective)
    t = inputs.timesteps
    assert t.dtype == torch.int64 and ((t >= 0) & (t < config.get("num_train_timesteps", 1000))).all()
    expected = torch.from_numpy(_published_alphas_cumprod(config))[t]
    assert torch.allclose(a**2, expected, atol=2e-5), (
        f"signal share {a.tolist()} vs published {expected.sqrt().tolist()}"
    )
    assert torch.allclose(a**2 + b**2, torch.ones_like(a), atol=0.03)  # variance preserving
    if objective.prediction_type == "epsilon":
        assert torch.allclose(c, torch.zeros_like(c), atol=1e-9) and torch.allclose(d, torch.ones_like(d), rtol=0.03)
    else:  # v = sqrt(abar) n - sqrt(1 - abar) x
        assert torch.allclose(c, -(1 - expected).sqrt(), atol=1e-4) and torch.allclose(
            d, expected.sqrt(), rtol=0.03, atol=1e-3
        )
    assert objective.prediction_type == ("v_prediction" if family_name == "cogvideox" else "epsilon")


def _median_sigma(objective, tokens: int = 3 * 32 * 32, draws: int = 4000) -> float:
    return objective.sigmas(draws, tokens, torch.Generator().manual_seed(0)).median().item()


def test_the_checkpoint_flow_shift_is_applied_and_a_parameter_overrides_it():
    config = published_scheduler_config("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    shift = config["flow_shift"]
    wan = get_family("wan")
    # logit-normal around 0 has median 0.5; shifted by k it becomes k / (1 + k)
    assert _median_sigma(wan.objective(_pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"))) == pytest.approx(
        shift / (1 + shift), abs=0.02
    )
    assert _median_sigma(
        wan.objective(_pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), ObjectiveParams(flow_shift=1.0))
    ) == pytest.approx(0.5, abs=0.02)
    unshifted = ObjectiveParams(timestep_sampling="uniform")
    assert _median_sigma(wan.objective(_pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), unshifted)) == pytest.approx(
        0.5, abs=0.03
    )
    hunyuan = get_family("hunyuan-video")  # FlowMatchEuler's fixed `shift` (7), whatever the token count
    for tokens in (256, 3 * 32 * 32):
        assert _median_sigma(hunyuan.objective(_pipe("hunyuanvideo-community/HunyuanVideo")), tokens) == pytest.approx(
            7 / 8, abs=0.02
        )


def test_ltx_shifts_by_token_count_as_its_scheduler_declares():
    config = published_scheduler_config("Lightricks/LTX-Video")
    assert config["use_dynamic_shifting"]
    ltx = get_family("ltx-video")
    for frames, size in ((3, 32), (4, 64)):
        tokens = frames * size * size
        slope = (config["max_shift"] - config["base_shift"]) / (
            config["max_image_seq_len"] - config["base_image_seq_len"]
        )
        mu = config["base_shift"] + slope * (tokens - config["base_image_seq_len"])
        expected = 1 / (1 + math.exp(-mu))  # median of sigmoid(N(0,1)) shifted by exp(mu)
        objective = ltx.objective(_pipe("Lightricks/LTX-Video"))
        assert _median_sigma(objective, tokens) == pytest.approx(expected, abs=0.02)
        # the training inputs count the tokens of the latents they are given
        inputs = objective.inputs(torch.zeros(8, 1, frames, size, size), torch.Generator().manual_seed(5))
        assert torch.allclose(inputs.timesteps, 1000 * objective.sigmas(8, tokens, torch.Generator().manual_seed(5)))


def test_timestep_bounds_and_sampling_modes():
    pipe = _pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    wan = get_family("wan")
    for mode in ("logit_normal", "uniform", "sigmoid", "shift"):
        params = ObjectiveParams(timestep_sampling=mode, min_timestep=200, max_timestep=700, sigmoid_scale=2.0)
        t = wan.objective(pipe, params).inputs(torch.zeros(512, 4, 1, 2, 2), torch.Generator().manual_seed(1)).timesteps
        assert t.min() >= 200 and t.max() <= 700 and t.std() > 50, mode
    bf16 = wan.objective(pipe).inputs(
        torch.zeros(64, 4, 1, 2, 2, dtype=torch.bfloat16), torch.Generator().manual_seed(2)
    )
    assert bf16.timesteps.dtype == torch.float32 and bf16.noisy.dtype == torch.bfloat16  # timesteps not rounded to bf16
    assert torch.allclose(bf16.timesteps, 1000 * wan.objective(pipe).sigmas(64, 4, torch.Generator().manual_seed(2)))
    vp = get_family("cogvideox").objective(
        _pipe("THUDM/CogVideoX-2b"), ObjectiveParams(min_timestep=100, max_timestep=300)
    )
    t = vp.inputs(torch.zeros(512, 4, 1, 2, 2), torch.Generator().manual_seed(1)).timesteps
    assert t.min() >= 100 and t.max() <= 299


def test_min_snr_gamma_and_flow_loss_weighting():
    family = get_family("animatediff")
    objective = family.objective(_pipe("stable-diffusion-v1-5/stable-diffusion-v1-5"), ObjectiveParams(snr_gamma=5.0))
    inputs = objective.inputs(torch.zeros(256, 4, 1, 2, 2), torch.Generator().manual_seed(0))
    alpha_bar = torch.from_numpy(
        _published_alphas_cumprod(published_scheduler_config("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    )
    snr = (alpha_bar / (1 - alpha_bar))[inputs.timesteps]
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert torch.allclose(inputs.weighting.flatten().double(), expected, rtol=1e-3)
    assert (inputs.weighting < 1).any() and (inputs.weighting == 1).any()  # low-noise steps are down-weighted

    cog = get_family("cogvideox").objective(_pipe("THUDM/CogVideoX-2b"), ObjectiveParams(snr_gamma=5.0))
    inputs = cog.inputs(torch.zeros(256, 4, 1, 2, 2), torch.Generator().manual_seed(0))
    alpha_bar = torch.from_numpy(_published_alphas_cumprod(published_scheduler_config("THUDM/CogVideoX-2b")))[
        inputs.timesteps
    ]
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(
        inputs.weighting.flatten().double(),
        torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1),
        rtol=1e-3,
        atol=1e-6,
    )

    wan = get_family("wan").objective(
        _pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), ObjectiveParams(loss_weighting="sigma_sqrt")
    )
    inputs = wan.inputs(torch.zeros(64, 4, 1, 2, 2), torch.Generator().manual_seed(0))
    s = inputs.timesteps / 1000
    assert torch.allclose(inputs.weighting.flatten(), s**-2.0, rtol=1e-4)  # SD3's sigma_sqrt weight


def test_settings_that_do_not_apply_to_the_family_are_refused_by_name():
    with pytest.raises(ValueError, match="flow_shift: applies to flow-matching families"):
        check_objective_params("vp", ObjectiveParams(flow_shift=3.0), "cogvideox")
    with pytest.raises(ValueError, match="snr_gamma: min-SNR weighting is for VP families"):
        check_objective_params("flow", ObjectiveParams(snr_gamma=5.0), "wan")
    with pytest.raises(ValueError, match="min_timestep"):
        ObjectiveParams(min_timestep=600, max_timestep=500)
    wan = get_family("wan")
    with pytest.raises(ValueError, match="flow-matching one"):
        get_family("cogvideox").objective(_pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"))
    with pytest.raises(ValueError, match="flow_shift: .* declares no flow-matching shift"):
        wan.objective(_pipe("stable-diffusion-v1-5/stable-diffusion-v1-5"))


def test_first_frame_conditioning_keeps_frame_zero_clean_at_timestep_zero_and_out_of_the_loss():
    """Image-to-video training inputs (LTX-Video I2V, Wan 2.2 TI2V): the noise level each latent frame got is
    recovered from the tensors (noisy = x + s (n - x), target = n - x), not from the schedule."""
    from vidtune.training.families.objectives import denoising_loss

    objective = get_family("ltx-video-i2v").objective(_pipe("Lightricks/LTX-Video"))
    latents = _latents()
    inputs = objective.inputs(latents, torch.Generator().manual_seed(1))
    per_frame = (1, 3, 4)  # least squares per (sample, frame) of noisy - x = s * target
    levels = ((inputs.noisy - latents) * inputs.target).sum(per_frame) / (inputs.target**2).sum(per_frame)
    assert torch.allclose(inputs.noisy[:, :, 0], latents[:, :, 0])  # frame 0: the clean latent
    assert levels[:, 0].abs().max() < 1e-5 and (levels[:, 1:] > 0.01).all()
    assert torch.allclose(levels[:, 1:], levels[:, 1:2].expand(-1, 2), atol=1e-4)  # one level for the later frames
    assert torch.allclose(inputs.timesteps.double(), levels * 1000, atol=0.1)  # per-frame timesteps: 0, then t
    assert inputs.timesteps.shape == (4, 3)

    pred = torch.randn_like(latents)
    moved = pred.clone()
    moved[:, :, 0] += 100  # frame 0's prediction is not learned
    assert denoising_loss(moved, inputs) == denoising_loss(pred, inputs)
    expected = ((pred[:, :, 1:] - inputs.target[:, :, 1:]) ** 2).mean()
    assert torch.allclose(denoising_loss(pred, inputs).double(), expected)
    plain = objective.objective.inputs(latents, torch.Generator().manual_seed(1))  # no mask: the mean of all
    assert torch.allclose(denoising_loss(pred, plain).double(), ((pred - plain.target) ** 2).mean())


def test_per_frame_timesteps_become_per_token_frame_by_frame():
    from vidtune.training.families.objectives import token_timesteps

    per_frame = torch.tensor([[0.0, 500.0, 500.0]])
    assert token_timesteps(per_frame, 2).tolist() == [[0, 0, 500, 500, 500, 500]]
    assert token_timesteps(torch.tensor([300.0]), 2).tolist() == [300]
