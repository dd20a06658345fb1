"""AnimateDiff: an image UNet (SD 1.5; SDXL likewise) plus a motion adapter's temporal layers — the Hotshot-XL
design. Epsilon prediction on a DDPM-style schedule; frames are VAE-encoded one by one."""

from __future__ import annotations

import torch

from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import ObjectiveParams, VariancePreserving, sample_posterior
from vidtune.training.published_configs import CLIP_SHRINK, TEXT, VAE_2D_SHRINK, Part, TinySpec

SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
SD15_UNET = {
    "block_out_channels": [16, 16, 16, 16],
    "attention_head_dim": 2,
    "cross_attention_dim": TEXT,
    "norm_num_groups": 2,
}  # 2 layers per block: the adapter has 2
SDXL_UNET = {
    "block_out_channels": [32, 64, 128],
    "attention_head_dim": [2, 4, 8],
    "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 2 * TEXT,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TEXT,
}  # both text encoders' widths concatenated; 6 time ids x 8 + the pooled projection


class AnimateDiffFamily(ModelFamily):
    denoiser_components = ("unet",)
    name = "animatediff"
    title = "AnimateDiff"
    pipeline_class_name = "AnimateDiffPipeline"
    denoiser_name = "unet"
    objective_kind = "vp"
    full_subsets = {"temporal": r"motion_modules\.", "spatial_attention": r"attentions\.\d+\.transformer_blocks"}
    frame_buckets = (16, 8)
    # an SD 1.5 checkpoint + the v1.5-2 motion adapter, with the scheduler diffusers' AnimateDiff docs set
    tiny_models = {
        "animatediff": TinySpec(
            {
                "unet": Part(SD15, "unet", SD15_UNET),
                "motion_adapter": Part(
                    "guoyww/animatediff-motion-adapter-v1-5-2",
                    ".",
                    {
                        "block_out_channels": [16, 16, 16, 16],
                        "motion_norm_num_groups": 2,
                        "motion_num_attention_heads": 2,
                    },
                ),
                "vae": Part(SD15, "vae", VAE_2D_SHRINK),
                "text_encoder": Part(SD15, "text_encoder", CLIP_SHRINK),
                "scheduler": Part("_derived/animatediff-docs-ddim-sd15", "scheduler"),
            },
            {"tokenizer": Part(SD15, "tokenizer")},
        )
    }

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
            moments = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.parameters
        return moments.reshape(batch, frames, *moments.shape[1:]).permute(0, 2, 1, 3, 4)

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(moments, generator) * pipe.vae.config.scaling_factor

    def objective(self, pipe, params: ObjectiveParams | None = None) -> VariancePreserving:
        """Epsilon prediction on the checkpoint's betas, whichever sampler (DDIM, PNDM, Euler, LCM) it ships."""
        return VariancePreserving.from_scheduler(pipe.scheduler, params, "epsilon")

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        frames = inputs.noisy.shape[2]
        per_frame = text.embeds.repeat_interleave(frames, dim=0)  # the UNet attends per frame, as the pipeline feeds it
        return (pipe.unet if denoiser is None else denoiser)(
            inputs.noisy, inputs.timesteps, encoder_hidden_states=per_frame, return_dict=False
        )[0]


class AnimateDiffSDXLFamily(AnimateDiffFamily):
    """AnimateDiff on an SDXL UNet: two text encoders, a pooled embedding and SDXL's size/crop time ids."""

    name = "animatediff-sdxl"
    title = "AnimateDiff-SDXL"
    pipeline_class_name = "AnimateDiffSDXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tiny_models = {
        "animatediff-sdxl": TinySpec(
            {
                "unet": Part(SDXL, "unet", SDXL_UNET),
                "motion_adapter": Part(
                    "guoyww/animatediff-motion-adapter-sdxl-beta", ".", {"block_out_channels": [32, 64, 128]}
                ),
                "vae": Part(SDXL, "vae", VAE_2D_SHRINK),
                "text_encoder": Part(SDXL, "text_encoder", CLIP_SHRINK),
                "text_encoder_2": Part(SDXL, "text_encoder_2", CLIP_SHRINK),
                "scheduler": Part("_derived/animatediff-docs-ddim-sdxl", "scheduler"),
            },
            {"tokenizer": Part(SDXL, "tokenizer"), "tokenizer_2": Part(SDXL, "tokenizer_2")},
        )
    }

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device, do_classifier_free_guidance=False)
        return TextEmbeddings(embeds, pooled=pooled)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        batch, _, frames, height, width = inputs.noisy.shape
        size = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)  # trained clips: uncropped, full size
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=text.embeds.dtype, text_encoder_projection_dim=text.pooled.shape[-1]
        )  # no text encoder loaded from a cache
        added = {"text_embeds": text.pooled, "time_ids": time_ids.to(inputs.noisy.device).repeat(batch, 1)}
        per_frame = text.embeds.repeat_interleave(frames, dim=0)
        return (pipe.unet if denoiser is None else denoiser)(
            inputs.noisy, inputs.timesteps, encoder_hidden_states=per_frame, added_cond_kwargs=added, return_dict=False
        )[0]
