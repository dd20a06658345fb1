"""AnimateDiff: an image UNet (SD 1.5; SDXL likewise) plus a motion adapter's temporal layers — the Hotshot-XL
design. Epsilon prediction on a DDPM-style schedule; frames are VAE-encoded one by one."""

from __future__ import annotations

import torch

from vidtune.training.families.base import TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import ObjectiveParams, VariancePreserving, sample_posterior


class AnimateDiffFamily:
    name = "animatediff"
    pipeline_class_name = "AnimateDiffPipeline"
    denoiser_name = "unet"
    text_encoders = ("text_encoder",)  # left out of training when prompts are cached
    objective_kind = "vp"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"temporal": r"motion_modules\.", "spatial_attention": r"attentions\.\d+\.transformer_blocks"}

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        from diffusers import AnimateDiffPipeline

        return AnimateDiffPipeline.from_pretrained(model, dtype=dtype, **components)

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

    def objective(self, pipe, params: ObjectiveParams | None = None) -> VariancePreserving:
        """Epsilon prediction on the checkpoint's betas, whichever sampler (DDIM, PNDM, Euler, LCM) it ships."""
        return VariancePreserving.from_scheduler(pipe.scheduler, params, "epsilon")

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        frames = inputs.noisy.shape[2]
        per_frame = text.embeds.repeat_interleave(frames, dim=0)  # the UNet attends per frame, as the pipeline feeds it
        return (pipe.unet if denoiser is None else denoiser)(inputs.noisy, inputs.timesteps, encoder_hidden_states=per_frame, return_dict=False)[0]


class AnimateDiffSDXLFamily(AnimateDiffFamily):
    """AnimateDiff on an SDXL UNet: two text encoders, a pooled embedding and SDXL's size/crop time ids."""

    name = "animatediff-sdxl"
    pipeline_class_name = "AnimateDiffSDXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        from diffusers import AnimateDiffSDXLPipeline

        return AnimateDiffSDXLPipeline.from_pretrained(model, dtype=dtype, **components)

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device, do_classifier_free_guidance=False)
        return TextEmbeddings(embeds, pooled=pooled)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        batch, _, frames, height, width = inputs.noisy.shape
        size = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)  # trained clips: uncropped, full size
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=text.embeds.dtype,
                                          text_encoder_projection_dim=text.pooled.shape[-1])  # no text encoder loaded from a cache  # fmt: skip
        added = {"text_embeds": text.pooled, "time_ids": time_ids.to(inputs.noisy.device).repeat(batch, 1)}
        per_frame = text.embeds.repeat_interleave(frames, dim=0)
        return (pipe.unet if denoiser is None else denoiser)(inputs.noisy, inputs.timesteps, encoder_hidden_states=per_frame, added_cond_kwargs=added, return_dict=False)[0]
