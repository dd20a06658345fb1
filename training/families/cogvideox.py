"""CogVideoX (`THUDM/CogVideoX-2b` / `-5b`): v-prediction on a DDPM-style schedule; the transformer takes
frames-first latents. Latents here stay (batch, channels, frames, h, w) like every family's."""

from __future__ import annotations

import torch

from vidtune.training.families.base import TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import ObjectiveParams, VariancePreserving, sample_posterior


class CogVideoXFamily:
    name = "cogvideox"
    pipeline_class_name = "CogVideoXPipeline"
    denoiser_name = "transformer"
    text_encoders = ("text_encoder",)  # left out of training when prompts are cached
    objective_kind = "vp"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"attention": r"\.attn1\.", "feed_forward": r"\.ff\."}

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline.from_pretrained(model, dtype=dtype, **components)

    def valid_num_frames(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % 4 == 0

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        length = pipe.transformer.config.max_text_seq_length  # the transformer's positional table fixes it
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=pipe.device)
        return TextEmbeddings(embeds)

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pipe.vae.encode(video.to(pipe.vae.dtype)).latent_dist.parameters

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
            rotary = pipe._prepare_rotary_positional_embeddings(height * scale, width * scale, frames, inputs.noisy.device)
        out = (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=frames_first, encoder_hidden_states=text.embeds, timestep=inputs.timesteps,
            image_rotary_emb=rotary, return_dict=False,
        )[0]  # fmt: skip
        return out.permute(0, 2, 1, 3, 4)
