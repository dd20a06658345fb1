"""Wan 2.1 and 2.2 text-to-video (default family; real target `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): flow matching.
Wan 2.2 is a configuration of the same classes: TI2V-5B has its own VAE (48 channels, 16x spatial) and per-token
timesteps (`expand_timesteps`); A14B has two experts (`transformer` above the boundary timestep, `transformer_2`
below it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vidtune.training.comfyui import ComfyUIKeys, Rule, renamed
from vidtune.training.experts import boundary_ratio
from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs, model_file
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, token_timesteps
from vidtune.training.published_configs import T5_SHRINK, TEXT, Part, TinySpec

ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}  # diffusers -> Wan attention leaves
WAN_13B, WAN_14B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN22_5B, WAN22_A14B = "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
TRANSFORMER_SHRINK = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "num_layers": 2,
    "text_dim": TEXT,
}
PROMPT_TOKENS = 512  # WanPipeline's and WanImageToVideoPipeline's max_sequence_length, as original Wan's text_len
VAE_SHRINK = {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
# Wan 2.2's residual VAE (patch 2, 48 channels): z_dim, dim_mult and latents_mean/std stay as published.
VAE22_SHRINK = {"base_dim": 4, "decoder_base_dim": 8, "num_res_blocks": 1}


def _tiny(
    repo: str,
    vae_shrink: dict = VAE_SHRINK,
    experts: tuple[str, ...] = ("transformer",),
    transformer_shrink: dict = TRANSFORMER_SHRINK,
) -> TinySpec:
    return TinySpec(
        {
            **{expert: Part(repo, expert, transformer_shrink) for expert in experts},  # A14B: both shrunk alike
            "vae": Part(repo, "vae", vae_shrink),
            "text_encoder": Part(repo, "text_encoder", T5_SHRINK),
            "scheduler": Part(repo, "scheduler"),
        },
        {"tokenizer": Part(repo, "tokenizer")},
        max_length=PROMPT_TOKENS,
        index=repo,  # Wan 2.2: expand_timesteps, boundary_ratio
    )


class WanFamily(ModelFamily):
    block_lists = ("blocks",)
    denoiser_components = ("transformer", "transformer_2")
    name = "wan"
    title = "Wan 2.1 / 2.2"
    pipeline_class_name = "WanPipeline"
    full_subsets = {"attention": r"\.attn[12]\.", "feed_forward": r"\.ffn\."}
    objective_kind = "flow"
    frame_buckets = (81, 49, 33, 17, 9)  # 81: the published clip length
    cache_revision = 2  # 1: prompts embedded at 512 tokens (226 before); 2: the latent mean alone, prompts cut
    # Wan's reference VAE encodes to the posterior mean (its `encode` returns mu), which the published models were
    # trained on and musubi-tuner and DiffSynth-Studio cache; the pipelines encode conditioning images to it too.
    caches_posterior = False
    tiny_models = {  # the 14B's configs through the same code path; Wan 2.2's as configurations of the same classes
        "wan": _tiny(WAN_13B),
        "wan-14b": _tiny(WAN_14B),
        "wan2.2-ti2v-5b": _tiny(WAN22_5B, VAE22_SHRINK),
        "wan2.2-t2v-a14b": _tiny(WAN22_A14B, experts=("transformer", "transformer_2")),
    }
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

    def check_model(self, model: str) -> None:
        """Refuse, before any work, a Wan this family cannot train: a first-last-frame one (FLF2V), and an
        image-to-video one (its transformer takes image latents beside the noisy ones) named as text-to-video."""
        file = model_file(model, "transformer/config.json")
        if file is None:
            return
        transformer = json.loads(file.read_text())
        if transformer.get("pos_embed_seq_len"):
            raise ValueError(
                f"model: {model} is a first-last-frame Wan (FLF2V: its image embedding takes the tokens of two frames, "
                f"pos_embed_seq_len {transformer['pos_embed_seq_len']}); vidtune trains image-to-video from the first "
                "frame only: use Wan2.1-I2V-14B-480P, Wan2.2-I2V-A14B or Wan2.2-TI2V-5B with family wan-i2v"
            )
        if not self.image_conditioned and transformer["in_channels"] != transformer["out_channels"]:
            raise ValueError(
                f"model: {model} is an image-to-video Wan (its transformer takes {transformer['in_channels']} "
                f"channels: image latents beside the {transformer['out_channels']} noisy ones); train it with "
                "family wan-i2v"
            )

    def check_clip_size(self, model: str, frames: int, height: int, width: int) -> None:
        """Refuse, naming the setting, clip sizes the VAE and patches do not divide (Wan 2.2 5B: 16x VAE, 2x2 patches:
        multiples of 32) and latent grids longer than the transformer's RoPE table (which would fail deep inside
        attention with a reshape error). Reads a local model's configs; hub ids pass."""
        folder = Path(model).expanduser()
        if not (folder / "transformer" / "config.json").is_file():
            return
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        vae_file = folder / "vae" / "config.json"
        vae = json.loads(vae_file.read_text()) if vae_file.is_file() else {}
        spatial, temporal = vae.get("scale_factor_spatial") or 8, vae.get("scale_factor_temporal") or 4  # 2.1: absent
        (pt, ph, pw), limit = transformer["patch_size"], transformer["rope_max_seq_len"]
        for setting, size, step in (("clips.height", height, spatial * ph), ("clips.width", width, spatial * pw)):
            if size % step:
                raise ValueError(
                    f"{setting}: {size} pixels is not a multiple of {step} (this model's VAE compresses {spatial}x and "
                    f"its transformer patches {step // spatial}x); curate at multiples of {step} "
                    f"(--set clips.buckets=[...] or {setting}=...)"
                )
        latent_frames = ((frames - 1) // temporal + 1) // pt
        grid = {
            "precompute.frame_buckets": (frames, latent_frames, temporal * pt, "frames", "train on shorter buckets"),
            "clips.height": (height, height // spatial // ph, spatial * ph, "pixels", "curate smaller clips"),
            "clips.width": (width, width // spatial // pw, spatial * pw, "pixels", "curate smaller clips"),
        }
        for setting, (size, patches, per_patch, unit, remedy) in grid.items():
            if patches > limit:
                raise ValueError(
                    f"{setting}: {size} {unit} make {patches} latent patches, more than this model's RoPE table holds "
                    f"(transformer rope_max_seq_len = {limit}: at most {limit * per_patch} {unit}); {remedy} "
                    f"(--set {setting}=...) or use a model with a longer table"
                )

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        """512 tokens, as the pipelines' `__call__` pads them (their `encode_prompt` alone defaults to 226): the
        padding is attended to, so training sees what sampling does, and Wan 2.1 I2V splits its image tokens off
        at 512 from the end."""
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=PROMPT_TOKENS, device=pipe.device
            )
        return TextEmbeddings(embeds)

    def _normalisation(self, pipe, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def sample_latents(self, pipe, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The cached posterior mean, normalised as Wan expects (no draw: `generator` is not used)."""
        shift, scale = self._normalisation(pipe, latents)
        return (latents - shift) / scale

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FlowMatching:
        """Flow matching at the checkpoint's `flow_shift` (UniPC's, for the published Wan 2.1 checkpoints)."""
        return FlowMatching.from_scheduler(pipe.scheduler, params)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        """The denoiser's output; with none given, the expert WanPipeline would use at these timesteps (Wan 2.2
        A14B: `transformer` at or above the boundary, `transformer_2` below)."""
        if denoiser is not None:
            return self._forward(pipe, denoiser, inputs, text)
        ratio = boundary_ratio(pipe.config)
        if ratio is None:
            return self._forward(pipe, pipe.transformer, inputs, text)
        high = inputs.timesteps >= ratio * pipe.scheduler.config.num_train_timesteps
        if high.all() or not high.any():
            return self._forward(pipe, pipe.transformer if high.all() else pipe.transformer_2, inputs, text)
        both = [self._forward(pipe, expert, inputs, text) for expert in (pipe.transformer, pipe.transformer_2)]
        return torch.where(high.view(-1, *[1] * (inputs.noisy.ndim - 1)), *both)

    def _forward(self, pipe, denoiser, inputs: TrainingInputs, text: TextEmbeddings) -> torch.Tensor:
        timesteps = inputs.timesteps
        if pipe.config.get(
            "expand_timesteps"
        ):  # Wan 2.2 5B: one timestep per token, frame by frame, as fed at sampling
            batch, _, frames, height, width = inputs.noisy.shape
            _, ph, pw = pipe.transformer.config.patch_size
            per_frame = timesteps if timesteps.ndim == 2 else timesteps[:, None].expand(batch, frames)
            timesteps = token_timesteps(per_frame, (height // ph) * (width // pw))
        return denoiser(
            hidden_states=inputs.noisy, timestep=timesteps, encoder_hidden_states=text.embeds, return_dict=False
        )[0]
