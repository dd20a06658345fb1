"""Tiny random models of the published checkpoints: each component is built from the checkpoint's own config
file (stored in `training/model_configs/<org>/<repo>/`) with only size fields shrunk (layers, heads, widths,
vocabulary, norm groups that must divide a width), and saved with `save_pretrained`. Schedulers, VAE
normalisation, compression ratios, RoPE and positional-table lengths, patch sizes and tokenizer lengths stay as
shipped, so the only difference between what tests train and what users train is size. Nothing is downloaded.

The output folder has the layout of a hub checkpoint (`model_index.json`, `transformer/` or `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) and loads with `DiffusionPipeline.from_pretrained(folder)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidtune.training.published_configs import build_from_config, published_config, published_scheduler

TOKENIZER_WORDS = ["a", "the", "of", "in", "with", "and", "style", "video", "shot", "scene", "person", "people", "car", "street", "city", "red", "blue", "green", "yellow", "purple", "light", "dark", "moving", "camera", "pan", "close", "wide", "night", "day", "beach", "sky", "water", "tree", "building", "road", "sks", "vidtune", "demo"]

WAN_13B, WAN_14B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"
LTX, COGVIDEOX = "Lightricks/LTX-Video", "THUDM/CogVideoX-2b"
SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"

TEXT = 32  # every tiny text encoder's width
T5_SHRINK = {"d_model": TEXT, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
CLIP_SHRINK = {"hidden_size": TEXT, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": TEXT}
VAE_2D_SHRINK = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 2}


@dataclass(frozen=True)
class Part:
    """One pipeline component: the published config at `repo`/`path`, with `shrink` replacing size fields."""

    repo: str
    path: str
    shrink: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TinySpec:
    family: str
    pipeline: str  # diffusers pipeline class
    parts: dict[str, Part]  # models and the scheduler (from their published files)
    tokenizers: dict[str, Part]  # tokenizer component -> its published tokenizer folder
    max_length: int | None = None  # the pipeline's own prompt length when the tokenizer config sets none


def _wan(repo: str) -> TinySpec:
    return TinySpec("wan", "WanPipeline", {
        "transformer": Part(repo, "transformer", {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "text_dim": TEXT}),
        "vae": Part(repo, "vae", {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}),
        "text_encoder": Part(repo, "text_encoder", T5_SHRINK),
        "scheduler": Part(repo, "scheduler"),
    }, {"tokenizer": Part(repo, "tokenizer")}, max_length=512)  # fmt: skip  (WanPipeline's max_sequence_length)


SD15_UNET = {"block_out_channels": [16, 16, 16, 16], "attention_head_dim": 2, "cross_attention_dim": TEXT, "norm_num_groups": 2}  # 2 layers per block: the adapter has 2
SDXL_UNET = {
    "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 2 * TEXT, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + TEXT,
}  # fmt: skip  (both text encoders' widths concatenated; 6 time ids x 8 + the pooled projection)

TINY_MODELS: dict[str, TinySpec] = {
    "wan": _wan(WAN_13B),
    "wan-14b": _wan(WAN_14B),  # the 14B's configs through the same code path
    "ltx-video": TinySpec("ltx-video", "LTXPipeline", {
        "transformer": Part(LTX, "transformer", {"in_channels": 8, "out_channels": 8, "num_attention_heads": 4, "attention_head_dim": 8,
                                                 "cross_attention_dim": 32, "num_layers": 1, "caption_channels": TEXT}),
        "vae": Part(LTX, "vae", {"latent_channels": 8, "block_out_channels": [8, 8, 8, 8], "layers_per_block": [1, 1, 1, 1, 1],
                                 "decoder_block_out_channels": [8, 8, 8, 8], "decoder_layers_per_block": [1, 1, 1, 1, 1]}),
        "text_encoder": Part(LTX, "text_encoder", T5_SHRINK),
        "scheduler": Part(LTX, "scheduler"),
    }, {"tokenizer": Part(LTX, "tokenizer")}, max_length=128),
    "cogvideox": TinySpec("cogvideox", "CogVideoXPipeline", {
        "transformer": Part(COGVIDEOX, "transformer", {"num_attention_heads": 4, "attention_head_dim": 8, "time_embed_dim": 8,
                                                       "text_embed_dim": TEXT, "num_layers": 1}),
        "vae": Part(COGVIDEOX, "vae", VAE_2D_SHRINK),
        "text_encoder": Part(COGVIDEOX, "text_encoder", T5_SHRINK),
        "scheduler": Part(COGVIDEOX, "scheduler"),
    }, {"tokenizer": Part(COGVIDEOX, "tokenizer")}, max_length=226),
    # AnimateDiff = an SD 1.5 checkpoint + the v1.5-2 motion adapter, with the scheduler diffusers' AnimateDiff docs set
    "animatediff": TinySpec("animatediff", "AnimateDiffPipeline", {
        "unet": Part(SD15, "unet", SD15_UNET),
        "motion_adapter": Part("guoyww/animatediff-motion-adapter-v1-5-2", ".", {"block_out_channels": [16, 16, 16, 16], "motion_norm_num_groups": 2,
                                                                                "motion_num_attention_heads": 2}),
        "vae": Part(SD15, "vae", VAE_2D_SHRINK),
        "text_encoder": Part(SD15, "text_encoder", CLIP_SHRINK),
        "scheduler": Part("_derived/animatediff-docs-ddim-sd15", "scheduler"),
    }, {"tokenizer": Part(SD15, "tokenizer")}),
    "animatediff-sdxl": TinySpec("animatediff-sdxl", "AnimateDiffSDXLPipeline", {
        "unet": Part(SDXL, "unet", SDXL_UNET),
        "motion_adapter": Part("guoyww/animatediff-motion-adapter-sdxl-beta", ".", {"block_out_channels": [32, 64, 128]}),
        "vae": Part(SDXL, "vae", VAE_2D_SHRINK),
        "text_encoder": Part(SDXL, "text_encoder", CLIP_SHRINK),
        "text_encoder_2": Part(SDXL, "text_encoder_2", CLIP_SHRINK),
        "scheduler": Part("_derived/animatediff-docs-ddim-sdxl", "scheduler"),
    }, {"tokenizer": Part(SDXL, "tokenizer"), "tokenizer_2": Part(SDXL, "tokenizer_2")}),
}  # fmt: skip


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _word_tokenizer(part: Part, max_length: int | None):
    """A word-level fast tokenizer (the real vocabularies are files we cannot ship) with the published special
    tokens, their positions (T5: pad 0, eos 1; CLIP: start and end of text last, so CLIP's legacy pooling at the
    highest id finds the end token) and the published `model_max_length`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    config = published_config(part.repo, f"{part.path}/tokenizer_config.json")
    special = published_config(part.repo, f"{part.path}/special_tokens_map.json")
    names = {name: _token(special.get(name, config.get(name))) for name in ("pad_token", "eos_token", "unk_token", "bos_token")}
    clip_style = names["eos_token"] == "<|endoftext|>"
    if clip_style:  # "!" is id 0 of CLIP's vocabulary: SDXL's second tokenizer pads with it
        tokens = ["!", *TOKENIZER_WORDS, names["bos_token"], names["eos_token"]]
        template = f"{names['bos_token']} $A {names['eos_token']}"
    else:
        decoder = config.get("added_tokens_decoder", {})
        leading = [decoder[i]["content"] for i in sorted(decoder, key=int) if int(i) < 16]  # pad, eos, (bos), unk as shipped
        tokens = list(dict.fromkeys([*leading, names["unk_token"], *TOKENIZER_WORDS]))
        template = f"$A {names['eos_token']}"
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [t for t in (names["bos_token"], names["eos_token"]) if t and t in template]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in specials])
    length = config.get("model_max_length")
    length = length if isinstance(length, int) and length < 1_000_000 else max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=length, **{k: v for k, v in names.items() if v})


def _component(name: str, part: Part, vocab_size: int):
    """A model built from its published config with the size fields replaced (random weights)."""
    if name == "scheduler":
        return published_scheduler(part.repo)
    config = {**published_config(part.repo, f"{part.path}/config.json"), **part.shrink}
    if "_class_name" not in config:  # a transformers text encoder: its vocabulary is our tokenizer's
        config["vocab_size"] = vocab_size
    return build_from_config(config)


def build_tiny(name: str, folder: str | Path, seed: int = 0) -> Path:
    """`name` is a key of TINY_MODELS (a family, or a published variant such as wan-14b)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(sorted(TINY_MODELS))}")
    import diffusers

    spec = TINY_MODELS[name]
    torch.manual_seed(seed)
    components = {key: _word_tokenizer(part, spec.max_length) for key, part in spec.tokenizers.items()}
    vocab_size = len(components["tokenizer"])
    components |= {key: _component(key, part, vocab_size) for key, part in spec.parts.items()}
    pipe = getattr(diffusers, spec.pipeline)(**components)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)  # laid out like a hub checkpoint, for from_pretrained
    return folder


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    return build_tiny("wan", folder, seed)
