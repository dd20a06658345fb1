"""LTX-Video (`Lightricks/LTX-Video`): flow matching on latents packed into tokens, RoPE scaled by frame rate."""

from __future__ import annotations

import torch

from vidtune.training.families.base import TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, sample_posterior


class LtxFamily:
    name = "ltx-video"
    pipeline_class_name = "LTXPipeline"
    denoiser_name = "transformer"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ff\."}
    text_encoders = ("text_encoder",)  # left out of training when prompts are cached
    objective_kind = "flow"
    frame_rate = 25  # the pipeline's default; RoPE is scaled by it, so training matches sampling

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        from diffusers import LTXPipeline

        return LTXPipeline.from_pretrained(model, dtype=dtype, **components)

    def valid_num_frames(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % 8 == 0  # LTX's VAE compresses time 8x after the first frame

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.device)
        return TextEmbeddings(embeds, mask)

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pipe.vae.encode(video.to(pipe.vae.dtype)).latent_dist.parameters

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        sample = sample_posterior(moments, generator)
        return pipe._normalize_latents(sample, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FlowMatching:
        """Flow matching; the published scheduler shifts dynamically by token count, and training does the same."""
        patch = (pipe.transformer_temporal_patch_size, pipe.transformer_spatial_patch_size, pipe.transformer_spatial_patch_size)
        return FlowMatching.from_scheduler(pipe.scheduler, params, patch)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        _, _, frames, height, width = inputs.noisy.shape
        p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        rope_scale = (pipe.vae_temporal_compression_ratio / self.frame_rate, pipe.vae_spatial_compression_ratio, pipe.vae_spatial_compression_ratio)
        packed = pipe._pack_latents(inputs.noisy, p, pt)
        out = (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=packed, encoder_hidden_states=text.embeds, timestep=inputs.timesteps,
            encoder_attention_mask=text.mask, num_frames=frames, height=height, width=width,
            rope_interpolation_scale=rope_scale, return_dict=False,
        )[0]  # fmt: skip
        return pipe._unpack_latents(out, frames, height, width, p, pt)
