"""LTX-Video (`Lightricks/LTX-Video`): flow matching on latents packed into tokens, RoPE scaled by frame rate."""

from __future__ import annotations

import torch

from vidtune.training.comfyui import ComfyUIKeys, Rule, same_names
from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, sample_posterior, token_timesteps
from vidtune.training.published_configs import T5_SHRINK, TEXT, Part, TinySpec

LTX = "Lightricks/LTX-Video"


class LtxFamily(ModelFamily):
    block_lists = ("transformer_blocks",)
    name = "ltx-video"
    title = "LTX-Video"
    pipeline_class_name = "LTXPipeline"
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ff\."}
    objective_kind = "flow"
    temporal_compression = 8
    frame_buckets = (121, 97, 65, 33, 17, 9)
    frame_rate = 25  # the pipeline's default; RoPE is scaled by it, so training matches sampling
    # ComfyUI's LTXV (comfy/ldm/lightricks/model.py) names its modules as diffusers does but for the two that
    # diffusers' single-file converter renames (patchify_proj -> proj_in, adaln_single -> time_embed)
    comfyui_keys = ComfyUIKeys(
        (Rule("proj_in", "patchify_proj"), Rule(r"time_embed\.(.+)", r"adaln_single.\1"))
        + same_names(
            r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
            r"caption_projection\.linear_[12]",
            "proj_out",
        ),
        source="LTX-Video's original module names, as ComfyUI's comfy/ldm/lightricks/model.py keeps them",
    )
    tiny_models = {
        "ltx-video": TinySpec(
            {
                "transformer": Part(
                    LTX,
                    "transformer",
                    {
                        "in_channels": 8,
                        "out_channels": 8,
                        "num_attention_heads": 4,
                        "attention_head_dim": 8,
                        "cross_attention_dim": 32,
                        "num_layers": 1,
                        "caption_channels": TEXT,
                    },
                ),
                "vae": Part(
                    LTX,
                    "vae",
                    {
                        "latent_channels": 8,
                        "block_out_channels": [8, 8, 8, 8],
                        "layers_per_block": [1, 1, 1, 1, 1],
                        "decoder_block_out_channels": [8, 8, 8, 8],
                        "decoder_layers_per_block": [1, 1, 1, 1, 1],
                    },
                ),
                "text_encoder": Part(LTX, "text_encoder", T5_SHRINK),
                "scheduler": Part(LTX, "scheduler"),
            },
            {"tokenizer": Part(LTX, "tokenizer")},
            max_length=128,
        )
    }

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.device)
        return TextEmbeddings(embeds, mask)

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        sample = sample_posterior(moments, generator)
        return pipe._normalize_latents(
            sample, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor
        )

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FlowMatching:
        """Flow matching; the published scheduler shifts dynamically by token count, and training does the same."""
        patch = (
            pipe.transformer_temporal_patch_size,
            pipe.transformer_spatial_patch_size,
            pipe.transformer_spatial_patch_size,
        )
        return FlowMatching.from_scheduler(pipe.scheduler, params, patch)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        _, _, frames, height, width = inputs.noisy.shape
        p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        rope_scale = (
            pipe.vae_temporal_compression_ratio / self.frame_rate,
            pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio,
        )
        packed = pipe._pack_latents(inputs.noisy, p, pt)
        out = (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=packed,
            encoder_hidden_states=text.embeds,
            timestep=token_timesteps(inputs.timesteps, packed.shape[1] // frames),
            encoder_attention_mask=text.mask,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=rope_scale,
            return_dict=False,
        )[0]
        return pipe._unpack_latents(out, frames, height, width, p, pt)
