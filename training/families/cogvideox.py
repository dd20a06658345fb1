"""CogVideoX (`THUDM/CogVideoX-2b` / `-5b`): v-prediction on a DDPM-style schedule; the transformer takes
frames-first latents. Latents here stay (batch, channels, frames, h, w) like every family's."""

from __future__ import annotations

import torch

from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import ObjectiveParams, VariancePreserving, sample_posterior
from vidtune.training.published_configs import T5_SHRINK, TEXT, VAE_2D_SHRINK, Part, TinySpec

COGVIDEOX = "THUDM/CogVideoX-2b"


class CogVideoXFamily(ModelFamily):
    block_lists = ("transformer_blocks",)
    precompute_reads_denoiser = True  # its latents follow the transformer's config
    name = "cogvideox"
    title = "CogVideoX"
    pipeline_class_name = "CogVideoXPipeline"
    objective_kind = "vp"
    full_subsets = {"attention": r"\.attn1\.", "feed_forward": r"\.ff\."}
    frame_buckets = (49, 33, 17, 9)
    tiny_models = {
        "cogvideox": TinySpec(
            {
                "transformer": Part(
                    COGVIDEOX,
                    "transformer",
                    {
                        "num_attention_heads": 4,
                        "attention_head_dim": 8,
                        "time_embed_dim": 8,
                        "text_embed_dim": TEXT,
                        "num_layers": 1,
                    },
                ),
                "vae": Part(COGVIDEOX, "vae", VAE_2D_SHRINK),
                "text_encoder": Part(COGVIDEOX, "text_encoder", T5_SHRINK),
                "scheduler": Part(COGVIDEOX, "scheduler"),
            },
            {"tokenizer": Part(COGVIDEOX, "tokenizer")},
            max_length=226,
        )
    }

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        length = pipe.transformer.config.max_text_seq_length  # the transformer's positional table fixes it
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=pipe.device
            )
        return TextEmbeddings(embeds)

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(moments, generator) * pipe.vae_scaling_factor_image

    def objective(self, pipe, params: ObjectiveParams | None = None) -> VariancePreserving:
        """v-prediction on the checkpoint's SNR-shifted, zero-terminal-SNR schedule (CogVideoX's DDIM/DPM schedulers)."""
        return VariancePreserving.from_scheduler(pipe.scheduler, params, "v_prediction")

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        frames_first = inputs.noisy.permute(0, 2, 1, 3, 4)
        _, frames, _, height, width = frames_first.shape
        rotary = None
        if pipe.transformer.config.use_rotary_positional_embeddings:
            scale = pipe.vae_scale_factor_spatial
            rotary = pipe._prepare_rotary_positional_embeddings(
                height * scale, width * scale, frames, inputs.noisy.device
            )
        out = (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=frames_first,
            encoder_hidden_states=text.embeds,
            timestep=inputs.timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)
