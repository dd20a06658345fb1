"""Tiny random models of the real classes the curation stages load, for tests and the demo.

They are saved exactly as users' models are (open_clip weights file; a transformers folder written by
`save_pretrained`) and loaded through the same code paths, so nothing downloads and nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CLIP = "vidtune-tiny-clip"  # registered from tasks/model_configs/ by vidtune.tasks.scoring
CAPTION_WORDS = [
    "a",
    "the",
    "video",
    "of",
    "shot",
    "scene",
    "with",
    "person",
    "people",
    "car",
    "street",
    "city",
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "light",
    "dark",
    "moving",
    "camera",
    "pan",
    "close",
    "wide",
    "night",
    "day",
    "beach",
    "sky",
    "water",
    "tree",
    "building",
    "road",
]


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Random weights for the `vidtune-tiny-clip` open_clip config, saved as safetensors at `path`."""
    import open_clip

    from vidtune.tasks.scoring import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def build_tiny_captioner(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner (BlipForConditionalGeneration + BlipProcessor with a BERT word-piece
    tokenizer written here), saved with `save_pretrained` so AutoProcessor/AutoModel load it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + CAPTION_WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        model_max_length=64,
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    text = dict(
        vocab_size=len(specials) + len(CAPTION_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    # An untrained model would stop at once; make it say a few words, as a trained one does.
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [0, 1, 2, 4]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
