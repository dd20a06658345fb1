"""Wan 2.1 text-to-video (default family; real target `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): flow matching."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from training.families.base import TextEmbeddings, TrainingInputs


class WanFamily:
    name = "wan"
    pipeline_class_name = "WanPipeline"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ffn\."}
    weighting_scheme = "logit_normal"  # SD3/Wan-style timestep density; loss weighting from the same helper

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32):
        from diffusers import WanPipeline

        return WanPipeline.from_pretrained(model, dtype=dtype)

    def valid_num_frames(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % 4 == 0  # the VAE compresses time 4x after the first frame

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.device)
        return TextEmbeddings(embeds)

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pipe.vae.encode(video.to(pipe.vae.dtype)).latent_dist.parameters

    def _normalisation(self, pipe, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior sample per step (the cache keeps moments, not one sample), normalised as Wan expects."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        sample = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        shift, scale = self._normalisation(pipe, sample)
        return (sample - shift) / scale

    def training_inputs(self, pipe, latents: torch.Tensor, generator: torch.Generator | None = None) -> TrainingInputs:
        scheduler = pipe.scheduler
        batch = latents.shape[0]
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(batch, 1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
        return TrainingInputs(
            noisy=(1 - sigmas) * latents + sigmas * noise,
            timesteps=scheduler.timesteps[indices].to(latents.device),
            target=noise - latents,  # flow matching: the velocity from data to noise
            weighting=weighting,
        )

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=inputs.noisy, timestep=inputs.timesteps, encoder_hidden_states=text.embeds, return_dict=False
        )[0]
