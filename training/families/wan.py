"""Wan 2.1 text-to-video (default family; real target `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): flow matching."""

from __future__ import annotations

import torch

from vidtune.training.comfyui import ComfyUIKeys, Rule, renamed
from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, sample_posterior
from vidtune.training.published_configs import T5_SHRINK, TEXT, Part, TinySpec

ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}  # diffusers -> Wan attention leaves
WAN_13B, WAN_14B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"


def _tiny(repo: str) -> TinySpec:
    return TinySpec(
        {
            "transformer": Part(
                repo,
                "transformer",
                {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "text_dim": TEXT},
            ),
            "vae": Part(repo, "vae", {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}),
            "text_encoder": Part(repo, "text_encoder", T5_SHRINK),
            "scheduler": Part(repo, "scheduler"),
        },
        {"tokenizer": Part(repo, "tokenizer")},
        max_length=512,
    )  # WanPipeline's max_sequence_length


class WanFamily(ModelFamily):
    name = "wan"
    title = "Wan 2.1"
    pipeline_class_name = "WanPipeline"
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ffn\."}
    objective_kind = "flow"
    frame_buckets = (81, 49, 33, 17, 9)  # 81: the published clip length
    tiny_models = {"wan": _tiny(WAN_13B), "wan-14b": _tiny(WAN_14B)}  # the 14B's configs through the same code path
    comfyui_keys = ComfyUIKeys(
        renamed(r"blocks\.(\d+)\.attn1", r"blocks.\1.self_attn", ATTENTION)
        + renamed(
            r"blocks\.(\d+)\.attn2",
            r"blocks.\1.cross_attn",
            {**ATTENTION, "add_k_proj": "k_img", "add_v_proj": "v_img"},
        )
        + renamed(r"blocks\.(\d+)\.ffn", r"blocks.\1.ffn", {"net.0.proj": "0", "net.2": "2"})
        + renamed(
            "condition_embedder",
            "",
            {
                "text_embedder.linear_1": "text_embedding.0",
                "text_embedder.linear_2": "text_embedding.2",
                "time_embedder.linear_1": "time_embedding.0",
                "time_embedder.linear_2": "time_embedding.2",
                "time_proj": "time_projection.1",
                "image_embedder.ff.net.0.proj": "img_emb.proj.1",
                "image_embedder.ff.net.2": "img_emb.proj.3",
            },
        )
        + (Rule("proj_out", "head.head"),),
        source="Wan's original module names, as ComfyUI's comfy/ldm/wan/model.py keeps them",
    )

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
        latent_frames = ((frames - 1) // 4 + 1) // pt
        grid = {
            "precompute.frame_buckets": (frames, latent_frames, 4 * pt, "frames", "train on shorter buckets"),
            "clips.height": (height, height // 8 // ph, 8 * ph, "pixels", "curate smaller clips"),
            "clips.width": (width, width // 8 // pw, 8 * pw, "pixels", "curate smaller clips"),
        }
        for setting, (size, patches, per_patch, unit, remedy) in grid.items():
            if patches > limit:
                raise ValueError(
                    f"{setting}: {size} {unit} make {patches} latent patches, more than this model's RoPE table holds "
                    f"(transformer rope_max_seq_len = {limit}: at most {limit * per_patch} {unit}); {remedy} "
                    f"(--set {setting}=...) or use a model with a longer table"
                )

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.device)
        return TextEmbeddings(embeds)

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
