"""Wan 2.1 text-to-video (default family; real target `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): flow matching."""

from __future__ import annotations

import torch

from vidtune.training.families.base import TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, sample_posterior


class WanFamily:
    name = "wan"
    pipeline_class_name = "WanPipeline"
    denoiser_name = "transformer"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ffn\."}
    text_encoders = ("text_encoder",)  # left out of training when prompts are cached
    objective_kind = "flow"
    # diffusers module names -> the original Wan names ComfyUI and most Wan tools key LoRAs by
    comfyui_renames = (
        (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
        (".to_out.0.", ".o."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".ffn.net.0.proj.", ".ffn.0."),
        (".ffn.net.2.", ".ffn.2."),
    )  # fmt: skip

    def check_clip_size(self, model: str, frames: int, height: int, width: int) -> None:
        """Refuse, naming the setting, clips whose latent grid is longer than the transformer's RoPE table (which
        would fail deep inside attention with a reshape error). Reads a local model's config; hub ids pass."""
        import json
        from pathlib import Path

        config_file = Path(model).expanduser() / "transformer" / "config.json"
        if not config_file.is_file():
            return
        config = json.loads(config_file.read_text())
        (pt, ph, pw), limit = config["patch_size"], config["rope_max_seq_len"]
        grid = {"precompute.frame_buckets": (frames, ((frames - 1) // 4 + 1) // pt, 4 * pt, "frames", "train on shorter buckets"),
                "clips.height": (height, height // 8 // ph, 8 * ph, "pixels", "curate smaller clips"),
                "clips.width": (width, width // 8 // pw, 8 * pw, "pixels", "curate smaller clips")}  # fmt: skip
        for setting, (size, patches, per_patch, unit, remedy) in grid.items():
            if patches > limit:
                raise ValueError(
                    f"{setting}: {size} {unit} make {patches} latent patches, more than this model's RoPE table holds "
                    f"(transformer rope_max_seq_len = {limit}: at most {limit * per_patch} {unit}); {remedy} "
                    f"(--set {setting}=...) or use a model with a longer table"
                )

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        from diffusers import WanPipeline

        return WanPipeline.from_pretrained(model, dtype=dtype, **components)

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
        sample = sample_posterior(moments, generator)
        shift, scale = self._normalisation(pipe, sample)
        return (sample - shift) / scale

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FlowMatching:
        """Flow matching at the checkpoint's `flow_shift` (UniPC's, for the published Wan 2.1 checkpoints)."""
        return FlowMatching.from_scheduler(pipe.scheduler, params)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        return (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=inputs.noisy, timestep=inputs.timesteps, encoder_hidden_states=text.embeds, return_dict=False
        )[0]
