"""Training objectives, built from the model's config rather than from whichever sampler the checkpoint ships.

An inference scheduler's `sigmas`, `timesteps` and `add_noise` are not a training objective: Wan ships UniPC with
VP sigmas up to ~157 beside `use_flow_sigmas`, Euler-type schedulers add `x + sigma n`. So:

- flow matching (Wan, LTX-Video): `noisy = (1 - s) x + s n`, `s` in [0, 1], `timestep = 1000 s`, target `n - x`,
  with `s` drawn by `timestep_sampling` and shifted by the flow shift the checkpoint declares (a fixed `flow_shift`
  / `shift`, or one set by the sequence length when it declares dynamic shifting, as LTX-Video does);
- VP (CogVideoX, AnimateDiff): `noisy = sqrt(abar_t) x + sqrt(1 - abar_t) n` on the checkpoint's own
  `alphas_cumprod` (its betas, with the SNR shift and zero-terminal-SNR rescale its scheduler applies), target
  epsilon or `v = sqrt(abar_t) n - sqrt(1 - abar_t) x`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Literal

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.training.families.base import TrainingInputs

TimestepSampling = Literal["logit_normal", "uniform", "sigmoid", "shift"]


class ObjectiveParams(BaseModel):
    """How training noise levels are drawn and weighted (the names musubi-tuner and diffusion-pipe users know)."""

    model_config = ConfigDict(extra="forbid")

    timestep_sampling: TimestepSampling | None = Field(
        None,
        description="How noise levels are drawn: logit_normal (sigmoid of N(logit_mean, logit_std), then flow_shift), "
        "uniform, sigmoid (sigmoid of sigmoid_scale * N(0, 1)), shift (sigmoid, then flow_shift: musubi-tuner's). "
        "Default: logit_normal for flow families (Wan, LTX-Video), uniform for VP families (CogVideoX, AnimateDiff).",
    )
    logit_mean: float = Field(0.0, description="Mean of the normal in logit_normal sampling.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the normal in logit_normal sampling.")
    sigmoid_scale: float = Field(
        1.0, gt=0, description="Scale of the normal in sigmoid and shift sampling (larger: closer to 0 and 1)."
    )
    flow_shift: float | None = Field(
        None,
        gt=0,
        description="Flow families: shift of the drawn sigmas, s -> k s / (1 + (k - 1) s); default: the checkpoint's "
        "(its scheduler's flow_shift or shift, or set by the clip's token count when it declares dynamic shifting); 1: none.",
    )
    min_timestep: int = Field(
        0, ge=0, lt=1000, description="Lowest training timestep (of 1000): draws are rescaled into [min, max]."
    )
    max_timestep: int = Field(1000, gt=0, le=1000, description="Highest training timestep (of 1000).")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Flow families: per-sample loss weight (SD3's schemes)."
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="VP families: min-SNR-gamma loss weighting (5 is usual); null: off."
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> ObjectiveParams:
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep})")
        return self


def check_objective_params(kind: Literal["flow", "vp"], params: ObjectiveParams, family: str) -> None:
    """Refuse settings that mean nothing for this family's objective, naming the field."""
    flow_only = "applies to flow-matching families (objective_kind flow)"
    if kind == "vp" and params.flow_shift is not None:
        raise ValueError(f"flow_shift: {flow_only}, not {family}")
    if kind == "vp" and params.loss_weighting != "none":
        raise ValueError(f"loss_weighting: {flow_only}, not {family}; VP families weight with snr_gamma")
    if kind == "vp" and params.timestep_sampling == "shift":
        raise ValueError(f"timestep_sampling: shift {flow_only}, not {family}")
    if kind == "flow" and params.snr_gamma is not None:
        raise ValueError(
            f"snr_gamma: min-SNR weighting is for VP families (cogvideox, animatediff), not {family}; see loss_weighting"
        )


def _draw_levels(
    params: ObjectiveParams, batch: int, default: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, bool]:
    """Per-sample levels in (0, 1) and whether the flow shift applies to them (logit_normal and shift do)."""
    mode = params.timestep_sampling or default
    device = generator.device if generator is not None else "cpu"
    if mode in ("logit_normal", "uniform"):  # diffusers' SD3 density; "none" is uniform
        scheme = "logit_normal" if mode == "logit_normal" else "none"
        levels = compute_density_for_timestep_sampling(
            scheme, batch, params.logit_mean, params.logit_std, device=device, generator=generator
        )
    else:
        levels = torch.sigmoid(params.sigmoid_scale * torch.randn(batch, generator=generator, device=device))
    return levels, mode in ("logit_normal", "shift")


def _noise_like(latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `latents`, drawn on the generator's device when one is given."""
    device = generator.device if generator is not None else latents.device
    return torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=device).to(latents.device)


@dataclass(frozen=True)
class FlowShift:
    """`s -> k s / (1 + (k - 1) s)`; with `dynamic` = (base_len, max_len, base_shift, max_shift), `mu` is linear in
    the token count and `k = exp(mu)` (or `mu` for a linear time shift), as diffusers' dynamic shifting sets it."""

    shift: float = 1.0
    dynamic: tuple[int, int, float, float] | None = None
    exponential: bool = True

    def for_tokens(self, tokens: int) -> float:
        if self.dynamic is None:
            return self.shift
        base_len, max_len, base_shift, max_shift = self.dynamic
        mu = base_shift + (max_shift - base_shift) * (tokens - base_len) / (max_len - base_len)
        shift = math.exp(mu) if self.exponential else mu
        if shift <= 0:
            raise ValueError(
                f"flow_shift: the checkpoint's dynamic shift is {shift:.3f} at {tokens} tokens; set flow_shift"
            )
        return shift

    @classmethod
    def from_scheduler_config(cls, config) -> FlowShift:
        """The shift a flow checkpoint's scheduler declares: UniPC/DPM-Solver `flow_shift` with `use_flow_sigmas`,
        FlowMatchEuler `shift`, or dynamic shifting by resolution."""
        if config.get("use_dynamic_shifting") and "base_image_seq_len" in config:
            dynamic = (
                config["base_image_seq_len"],
                config["max_image_seq_len"],
                config["base_shift"],
                config["max_shift"],
            )
            return cls(dynamic=dynamic, exponential=config.get("time_shift_type", "exponential") == "exponential")
        if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
            return cls(float(config.get("flow_shift", 1.0)))
        if "shift" in config:
            return cls(float(config["shift"]))
        name = config.get("_class_name", "the scheduler")
        raise ValueError(
            f"flow_shift: {name} declares no flow-matching shift (not a flow checkpoint's scheduler?); set flow_shift"
        )


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow: `noisy = (1 - s) x + s n`, `timestep = 1000 s`, target `n - x`."""

    shift: FlowShift
    params: ObjectiveParams
    patch: tuple[int, int, int] = (1, 1, 1)  # (time, height, width) latents per token, for dynamic shifting
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(
        cls, scheduler, params: ObjectiveParams | None, patch: tuple[int, int, int] = (1, 1, 1)
    ) -> FlowMatching:
        params = params or ObjectiveParams()
        shift = (
            FlowShift(params.flow_shift)
            if params.flow_shift is not None
            else FlowShift.from_scheduler_config(scheduler.config)
        )
        return cls(shift, params, patch, int(scheduler.config.get("num_train_timesteps", 1000)))

    def sigmas(
        self,
        batch: int,
        tokens: int,
        generator: torch.Generator | None = None,
        within: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """`batch` levels; with `within` = [low, high), only levels in it (a Wan 2.2 expert's range)."""
        if within is None:
            return self._draw(batch, tokens, generator)
        # Redrawn until they fall in range (not rescaled into it): an expert sees the levels the whole model would.
        kept = torch.empty(0)
        for _ in range(10_000):
            drawn = self._draw(max(batch, 64), tokens, generator)
            below = drawn <= within[1] if within[1] >= 1.0 else drawn < within[1]  # [low, high), 1 included
            inside = (drawn >= within[0]) & below
            kept = torch.cat([kept.to(drawn.device), drawn[inside]])
            if len(kept) >= batch:
                return kept[:batch]
        raise ValueError(
            f"min_timestep/max_timestep: almost no draw falls in this expert's timesteps "
            f"[{within[0] * 1000:g}, {within[1] * 1000:g}); widen them or choose the other expert"
        )

    def _draw(self, batch: int, tokens: int, generator: torch.Generator | None) -> torch.Tensor:
        levels, shifted = _draw_levels(self.params, batch, "logit_normal", generator)
        if shifted:
            k = self.shift.for_tokens(tokens)
            levels = k * levels / (1 + (k - 1) * levels)
        low, high = self.params.min_timestep / 1000, self.params.max_timestep / 1000
        return low + (high - low) * levels

    def inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        within: tuple[float, float] | None = None,
    ) -> TrainingInputs:
        batch, shape = latents.shape[0], (latents.shape[0],) + (1,) * (latents.ndim - 1)
        tokens = math.prod(size // step for size, step in zip(latents.shape[2:], self.patch))
        exact = self.sigmas(batch, tokens, generator, within).to(latents.device)  # float32: not rounded to bf16
        sigmas = exact.to(latents.dtype).view(shape)
        noise = _noise_like(latents, generator)
        return TrainingInputs(
            noisy=(1 - sigmas) * latents + sigmas * noise,
            timesteps=exact * self.num_train_timesteps,
            target=noise - latents,
            weighting=compute_loss_weighting_for_sd3(self.params.loss_weighting, sigmas),
        )

    def inputs_at(self, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> TrainingInputs:
        """Inputs at given sigmas `levels` (batch,) in [0, 1] and `noise`, unweighted: the fixed evaluation's, where
        no training setting (sampling, shift, timestep range, weighting) applies."""
        shape = (latents.shape[0],) + (1,) * (latents.ndim - 1)
        sigmas = levels.to(latents.device, latents.dtype).view(shape)
        noise = noise.to(latents.device, latents.dtype)
        return TrainingInputs(
            noisy=(1 - sigmas) * latents + sigmas * noise,
            timesteps=levels.to(latents.device, torch.float32) * self.num_train_timesteps,
            target=noise - latents,
            weighting=torch.ones(shape, dtype=latents.dtype, device=latents.device),
        )


@dataclass(frozen=True)
class VariancePreserving:
    """DDPM-style: `noisy = sqrt(abar_t) x + sqrt(1 - abar_t) n` with the checkpoint's `alphas_cumprod`."""

    alphas_cumprod: torch.Tensor
    prediction_type: Literal["epsilon", "v_prediction"]
    params: ObjectiveParams

    @classmethod
    def from_scheduler(cls, scheduler, params: ObjectiveParams | None, default_prediction: str) -> VariancePreserving:
        """Every VP scheduler computes `alphas_cumprod` from the checkpoint's betas at construction, with its own
        SNR shift (CogVideoX's `snr_shift_scale`) and zero-terminal-SNR rescale: that table is the model's."""
        config, name = scheduler.config, type(scheduler).__name__
        if (
            config.get("use_flow_sigmas")
            or config.get("prediction_type") == "flow_prediction"
            or not hasattr(scheduler, "alphas_cumprod")
        ):
            raise ValueError(
                f"model: its scheduler {name} is a flow-matching one, but this family trains a VP (DDPM-style) objective"
            )
        prediction = config.get("prediction_type") or default_prediction
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"model: scheduler {name} declares prediction_type={prediction!r}; training supports epsilon and v_prediction"
            )
        return cls(
            torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone(),
            prediction,
            params or ObjectiveParams(),
        )

    def timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        levels, _ = _draw_levels(self.params, batch, "uniform", generator)
        steps = len(self.alphas_cumprod)
        low, high = self.params.min_timestep * steps // 1000, self.params.max_timestep * steps // 1000
        return (low + levels * (high - low)).long().clamp(low, high - 1)

    def inputs(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> TrainingInputs:
        batch, shape = latents.shape[0], (latents.shape[0],) + (1,) * (latents.ndim - 1)
        timesteps = self.timesteps(batch, generator)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()].view(shape)
        signal, noise_level = (
            alpha_bar.sqrt().to(latents.device, latents.dtype),
            (1 - alpha_bar).sqrt().to(latents.device, latents.dtype),
        )
        noise = _noise_like(latents, generator)
        target = noise if self.prediction_type == "epsilon" else signal * noise - noise_level * latents
        return TrainingInputs(
            noisy=signal * latents + noise_level * noise,
            timesteps=timesteps.to(latents.device),
            target=target,
            weighting=self.min_snr_weights(timesteps).to(latents.device, latents.dtype).view(shape),
        )

    def inputs_at(self, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> TrainingInputs:
        """Inputs at the timesteps `levels` (batch,) in [0, 1) of the checkpoint's schedule point to, with `noise`,
        unweighted (the fixed evaluation's)."""
        shape, steps = (latents.shape[0],) + (1,) * (latents.ndim - 1), len(self.alphas_cumprod)
        timesteps = (levels.double() * steps).long().clamp(0, steps - 1)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()].view(shape)
        signal = alpha_bar.sqrt().to(latents.device, latents.dtype)
        noise_level = (1 - alpha_bar).sqrt().to(latents.device, latents.dtype)
        noise = noise.to(latents.device, latents.dtype)
        target = noise if self.prediction_type == "epsilon" else signal * noise - noise_level * latents
        return TrainingInputs(
            noisy=signal * latents + noise_level * noise,
            timesteps=timesteps.to(latents.device),
            target=target,
            weighting=torch.ones(shape, dtype=latents.dtype, device=latents.device),
        )

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v; ones when off."""
        if self.params.snr_gamma is None:
            return torch.ones(len(timesteps))
        snr = compute_snr(SimpleNamespace(alphas_cumprod=self.alphas_cumprod.float()), timesteps.cpu())
        clipped = snr.clamp(max=self.params.snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))  # zero terminal SNR: weight 1


def condition_on_first_frame(inputs: TrainingInputs, latents: torch.Tensor) -> TrainingInputs:
    """First-frame (image-to-video) conditioning of `inputs` drawn for clean `latents` (batch, channels, frames, h,
    w), as LTX-Video's and Wan 2.2 TI2V's image-to-video pipelines sample: latent frame 0 is the clean latent with
    timestep 0, the other frames keep their noise level t; timesteps become per latent frame (batch, frames), and
    the loss covers frames 1.. only (frame 0 is given, not predicted)."""
    batch, frames = latents.shape[0], latents.shape[2]
    noisy = torch.cat([latents[:, :, :1], inputs.noisy[:, :, 1:]], dim=2)
    timesteps = inputs.timesteps.reshape(batch, 1).expand(batch, frames).clone()
    timesteps[:, 0] = 0
    mask = torch.ones(batch, 1, frames, 1, 1, dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 0
    return replace(inputs, noisy=noisy, timesteps=timesteps, loss_mask=mask)


def token_timesteps(timesteps: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Per-frame timesteps (batch, frames) -> per-token (batch, frames * tokens_per_frame), for a transformer whose
    tokens are packed frame by frame; per-sample ones (batch,) pass through."""
    return timesteps if timesteps.ndim == 1 else timesteps.repeat_interleave(tokens_per_frame, dim=1)


@dataclass(frozen=True)
class FirstFrameConditioned:
    """An objective whose inputs are conditioned on the clip's first frame (`condition_on_first_frame`); the noise
    levels are the wrapped objective's."""

    objective: FlowMatching

    def sigmas(self, *args, **kwargs) -> torch.Tensor:
        return self.objective.sigmas(*args, **kwargs)

    def inputs(self, latents: torch.Tensor, generator: torch.Generator | None = None, within=None) -> TrainingInputs:
        return condition_on_first_frame(self.objective.inputs(latents, generator, within), latents)

    def inputs_at(self, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> TrainingInputs:
        return condition_on_first_frame(self.objective.inputs_at(latents, levels, noise), latents)


def denoising_loss(pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
    """Weighted squared error against the target: the mean over every element, or over those `loss_mask` keeps."""
    error = inputs.weighting.float() * (pred.float() - inputs.target.float()) ** 2
    if inputs.loss_mask is None:
        return error.mean()
    mask = inputs.loss_mask.float().expand_as(error)
    return (error * mask).sum() / mask.sum().clamp(min=1)


def sample_posterior(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample of the diagonal Gaussian whose mean and log-variance are stacked on dim 1."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
