"""AnimateDiff: an image UNet (SD 1.5; SDXL likewise) plus a motion adapter's temporal layers — the Hotshot-XL
design. Epsilon prediction on a DDPM-style schedule; frames are VAE-encoded one by one."""

from __future__ import annotations

import torch

from training.families.base import TextEmbeddings, TrainingInputs
from training.families.flow_matching import sample_posterior


class AnimateDiffFamily:
    name = "animatediff"
    pipeline_class_name = "AnimateDiffPipeline"
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"temporal": r"motion_modules\.", "spatial_attention": r"attentions\.\d+\.transformer_blocks"}

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32):
        from diffusers import AnimateDiffPipeline

        return AnimateDiffPipeline.from_pretrained(model, dtype=dtype)

    def valid_num_frames(self, frames: int) -> bool:
        return 1 <= frames <= 32  # motion modules hold 32 positions; frames are not compressed in time

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, do_classifier_free_guidance=False)
        return TextEmbeddings(embeds)

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = video.shape
        images = video.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        with torch.no_grad():
            moments = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist.parameters
        return moments.reshape(batch, frames, *moments.shape[1:]).permute(0, 2, 1, 3, 4)

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(moments, generator) * pipe.vae.config.scaling_factor

    def training_inputs(self, pipe, latents: torch.Tensor, generator: torch.Generator | None = None) -> TrainingInputs:
        scheduler = pipe.scheduler
        batch = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
        return TrainingInputs(
            noisy=scheduler.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            target=noise,  # epsilon prediction
            weighting=torch.ones((batch,) + (1,) * (latents.ndim - 1), dtype=latents.dtype, device=latents.device),
        )

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings) -> torch.Tensor:
        frames = inputs.noisy.shape[2]
        per_frame = text.embeds.repeat_interleave(frames, dim=0)  # the UNet attends per frame, as the pipeline feeds it
        return pipe.unet(inputs.noisy, inputs.timesteps, encoder_hidden_states=per_frame, return_dict=False)[0]
