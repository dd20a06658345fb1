"""Training inputs shared across families: rectified flow (Wan, LTX-Video) and DDPM-style noising with epsilon or
v targets (AnimateDiff, CogVideoX); and sampling from cached posterior moments."""

from __future__ import annotations

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from training.families.base import TrainingInputs


def flow_matching_inputs(
    scheduler, latents: torch.Tensor, weighting_scheme: str = "logit_normal", generator: torch.Generator | None = None
) -> TrainingInputs:
    """Sample a sigma per sample from the scheduler's (shifted) schedule with diffusers' timestep density, and
    build noisy = (1 - s) x + s n with the velocity target n - x."""
    batch = latents.shape[0]
    steps = scheduler.config.num_train_timesteps
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * steps).long().clamp(max=steps - 1)
    shape = (batch,) + (1,) * (latents.ndim - 1)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(shape)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    return TrainingInputs(
        noisy=(1 - sigmas) * latents + sigmas * noise,
        timesteps=scheduler.timesteps[indices].to(latents.device),
        target=noise - latents,
        weighting=compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas),
    )


def sample_posterior(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample of the diagonal Gaussian whose mean and log-variance are stacked on dim 1."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)


def ddpm_inputs(
    scheduler, latents: torch.Tensor, prediction_type: str, generator: torch.Generator | None = None
) -> TrainingInputs:
    """Uniform timesteps, `scheduler.add_noise`, and the target the family predicts (epsilon or v)."""
    batch = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    return TrainingInputs(
        noisy=scheduler.add_noise(latents, noise, timesteps),
        timesteps=timesteps,
        target=target,
        weighting=torch.ones((batch,) + (1,) * (latents.ndim - 1), dtype=latents.dtype, device=latents.device),
    )
