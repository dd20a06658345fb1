"""HunyuanVideo text-to-video (`hunyuanvideo-community/HunyuanVideo`): flow matching at the checkpoint's fixed
shift, prompts from a Llama encoder (a hidden layer, the prompt template cropped off) plus CLIP-L's pooled
embedding, and the guidance-distilled transformer's embedded guidance."""

from __future__ import annotations

import torch

from vidtune.training.comfyui import ComfyUIKeys, Rule, renamed
from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs
from vidtune.training.families.objectives import FlowMatching, ObjectiveParams, sample_posterior
from vidtune.training.published_configs import CLIP_SHRINK, TEXT, Part, TinySpec

HUNYUAN_VIDEO = "hunyuanvideo-community/HunyuanVideo"
QKV = ("to_q", "to_k", "to_v")
MLP = {"net.0.proj": "fc1", "net.2": "fc2"}
# diffusers -> the original Tencent names, which ComfyUI's HunyuanVideo accepts under `diffusion_model.` (its
# diffusion-pipe alias in comfy/lora.py) and diffusers' own converters read back. Fused originals take a stack of the
# diffusers LoRAs: img_attn_qkv = attn.to_q|to_k|to_v, linear1 = attn.to_q|to_k|to_v|proj_mlp (ComfyUI splits its
# output in that order: comfy/ldm/flux/layers.py SingleStreamBlock).
COMFYUI_KEYS = ComfyUIKeys(
    (
        Rule(r"transformer_blocks\.(\d+)\.attn\.(?P<part>to_q|to_k|to_v)", r"double_blocks.\1.img_attn_qkv", QKV),
        Rule(
            r"transformer_blocks\.(\d+)\.attn\.(?P<part>add_q_proj|add_k_proj|add_v_proj)",
            r"double_blocks.\1.txt_attn_qkv",
            ("add_q_proj", "add_k_proj", "add_v_proj"),
        ),
        Rule(
            r"single_transformer_blocks\.(\d+)\.(?P<part>attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)",
            r"single_blocks.\1.linear1",
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        ),
        Rule(
            r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.(?P<part>to_q|to_k|to_v)",
            r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv",
            QKV,
        ),
        Rule("proj_out", "final_layer.linear"),
        Rule(r"context_embedder\.proj_in", "txt_in.input_embedder"),
    )
    + renamed(
        r"transformer_blocks\.(\d+)",
        r"double_blocks.\1",
        {
            "attn.to_out.0": "img_attn_proj",
            "attn.to_add_out": "txt_attn_proj",
            "norm1.linear": "img_mod.linear",
            "norm1_context.linear": "txt_mod.linear",
            **{f"ff.{k}": f"img_mlp.{v}" for k, v in MLP.items()},
            **{f"ff_context.{k}": f"txt_mlp.{v}" for k, v in MLP.items()},
        },
    )
    + renamed(
        r"single_transformer_blocks\.(\d+)",
        r"single_blocks.\1",
        {"proj_out": "linear2", "norm.linear": "modulation.linear"},
    )
    + renamed(
        r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)",
        r"txt_in.individual_token_refiner.blocks.\1",
        {
            "attn.to_out.0": "self_attn_proj",
            "norm_out.linear": "adaLN_modulation.1",
            **{f"ff.{k}": f"mlp.{v}" for k, v in MLP.items()},
        },
    ),
    source="HunyuanVideo's original module names, which ComfyUI's comfy/lora.py maps for HunyuanVideo",
)
LLAMA_SHRINK = {
    "hidden_size": TEXT,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_hidden_layers": 3,
}


class HunyuanVideoFamily(ModelFamily):
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    name = "hunyuan-video"
    title = "HunyuanVideo"
    pipeline_class_name = "HunyuanVideoPipeline"
    objective_kind = "flow"
    text_encoders = ("text_encoder", "text_encoder_2")
    full_subsets = {"attention": r"\.attn\.", "feed_forward": r"\.ff(_context)?\."}
    frame_buckets = (129, 65, 33, 17, 9)  # 129: the published clip length
    comfyui_keys = COMFYUI_KEYS
    # Training conditions on guidance 1 (the distilled guidance embedding's "no extra guidance"), as the
    # HunyuanVideo LoRA trainers do; sampling passes its guidance_scale, x1000 like the pipeline.
    training_guidance = 1.0
    tiny_models = {
        "hunyuan-video": TinySpec(
            {
                "transformer": Part(
                    HUNYUAN_VIDEO,
                    "transformer",
                    {
                        "num_attention_heads": 2,
                        "attention_head_dim": 16,
                        "rope_axes_dim": [4, 6, 6],
                        "num_layers": 1,
                        "num_single_layers": 1,
                        "num_refiner_layers": 1,
                        "text_embed_dim": TEXT,
                        "pooled_projection_dim": TEXT,
                    },
                ),
                "vae": Part(
                    HUNYUAN_VIDEO,
                    "vae",
                    {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 2},
                ),
                "text_encoder": Part(HUNYUAN_VIDEO, "text_encoder", LLAMA_SHRINK),
                "text_encoder_2": Part(HUNYUAN_VIDEO, "text_encoder_2", CLIP_SHRINK),
                "scheduler": Part(HUNYUAN_VIDEO, "scheduler"),
            },
            {"tokenizer": Part(HUNYUAN_VIDEO, "tokenizer"), "tokenizer_2": Part(HUNYUAN_VIDEO, "tokenizer_2")},
            max_length=256,
        )
    }  # HunyuanVideoPipeline's max_sequence_length

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings:
        with torch.no_grad():
            embeds, pooled, mask = pipe.encode_prompt(prompts, device=pipe.device)
        return TextEmbeddings(embeds, mask, pooled)

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(moments, generator) * pipe.vae.config.scaling_factor  # the pipeline divides it back out

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FlowMatching:
        """Flow matching at the checkpoint's FlowMatchEuler `shift` (7 for the published model)."""
        return FlowMatching.from_scheduler(pipe.scheduler, params)

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        guidance = torch.full(
            (inputs.noisy.shape[0],),
            self.training_guidance * 1000.0,
            device=inputs.noisy.device,
            dtype=inputs.noisy.dtype,
        )
        return (pipe.transformer if denoiser is None else denoiser)(
            hidden_states=inputs.noisy,
            timestep=inputs.timesteps,
            encoder_hidden_states=text.embeds,
            encoder_attention_mask=text.mask,
            pooled_projections=text.pooled,
            guidance=guidance,
            return_dict=False,
        )[0]
