"""Tiny random models of the real diffusers pipelines, built from config and saved with `save_pretrained`.

The output folder has the layout of a hub checkpoint (`model_index.json`, `transformer/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) and loads with `DiffusionPipeline.from_pretrained(folder)`, the path
users take with real weights. Sizes follow diffusers' own test configurations; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

TOKENIZER_WORDS = ["a", "the", "of", "in", "with", "and", "style", "video", "shot", "scene", "person", "people", "car", "street", "city", "red", "blue", "green", "yellow", "purple", "light", "dark", "moving", "camera", "pan", "close", "wide", "night", "day", "beach", "sky", "water", "tree", "building", "road", "sks", "vidtune", "demo"]


def _word_tokenizer(max_length: int):
    """A word-level fast tokenizer written locally with the `tokenizers` library (T5-style specials)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + TOKENIZER_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _save(pipe, folder: str | Path) -> Path:
    """Write the pipeline the way a hub checkpoint is laid out (safetensors), for `from_pretrained`."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )  # fmt: skip


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Wan 2.1 text-to-video pipeline (WanTransformer3DModel, AutoencoderKLWan, UMT5 encoder)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(max_length=32)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    return _save(pipe, folder)


def build_tiny_ltx(folder: str | Path, seed: int = 0) -> Path:
    """A tiny LTX-Video pipeline (LTXVideoTransformer3DModel, AutoencoderKLLTXVideo, T5 encoder)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(max_length=32)
    text_encoder = _tiny_t5(len(tokenizer))
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    )  # fmt: skip
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, folder)


def build_tiny_cogvideox(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CogVideoX pipeline (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, T5 encoder, DDIM v-pred)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(max_length=226)
    text_encoder = _tiny_t5(len(tokenizer))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226,
    )  # fmt: skip
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    return _save(pipe, folder)


def build_tiny_animatediff(folder: str | Path, seed: int = 0) -> Path:
    """A tiny AnimateDiff pipeline: SD-1.5-style UNet + MotionAdapter (saved as a UNetMotionModel), a 2D VAE and
    a CLIP text encoder."""
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )  # fmt: skip
    adapter = MotionAdapter(block_out_channels=(8, 8), motion_layers_per_block=2, motion_norm_num_groups=2, motion_num_attention_heads=4)
    vae = AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=adapter, scheduler=scheduler)
    return _save(pipe, folder)


def build_tiny_animatediff_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """A tiny AnimateDiff-SDXL pipeline: SDXL-style UNet (text_time conditioning) + MotionAdapter, two CLIP
    text encoders (the second with projection), a 2D VAE."""
    from diffusers import (
        AnimateDiffSDXLPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=0, eos_token_id=1, projection_dim=32,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 8),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2, 4), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=1,
    )  # fmt: skip
    adapter = MotionAdapter(
        block_out_channels=(32, 64, 128), motion_layers_per_block=2, motion_norm_num_groups=2,
        motion_num_attention_heads=4, use_motion_mid_block=False,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )  # fmt: skip
    pipe = AnimateDiffSDXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False),
    )  # fmt: skip
    return _save(pipe, folder)


TINY_BUILDERS: dict[str, Callable[[str | Path], Path]] = {
    "wan": build_tiny_wan,
    "ltx-video": build_tiny_ltx,
    "cogvideox": build_tiny_cogvideox,
    "animatediff": build_tiny_animatediff,
    "animatediff-sdxl": build_tiny_animatediff_sdxl,
}


def build_tiny_model(family: str, folder: str | Path) -> Path:
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(sorted(TINY_BUILDERS))}")
    return TINY_BUILDERS[family](folder)
