"""Tiny random models of the published checkpoints: each component is built from the checkpoint's own config
file (stored in `training/model_configs/<org>/<repo>/`) with only size fields shrunk (layers, heads, widths,
vocabulary, norm groups that must divide a width), and saved with `save_pretrained`. Schedulers, VAE
normalisation, compression ratios, RoPE and positional-table lengths, patch sizes and tokenizer lengths stay as
shipped, so the only difference between what tests train and what users train is size. Nothing is downloaded.

The output folder has the layout of a hub checkpoint (`model_index.json`, `transformer/` or `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) and loads with `DiffusionPipeline.from_pretrained(folder)`.

The curation models (a CLIP of open_clip's classes and a BLIP captioner) are here too: saved as users' models
are (an open_clip weights file; a transformers folder from `save_pretrained`) and loaded through the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vidtune.training.families import FAMILIES, ModelFamily
from vidtune.training.published_configs import Part, TinySpec, build_from_config, published_config, published_scheduler

SCENE_WORDS = "person people car street city red blue green yellow purple light dark moving camera pan close wide night day beach sky water tree building road".split()
TOKENIZER_WORDS = [*"a the of in with and style video shot scene".split(), *SCENE_WORDS, "sks", "vidtune", "demo"]

# variant -> its family: each family's `tiny_models` (Wan twice: the 1.3B's configs and the 14B's)
TINY_MODELS: dict[str, ModelFamily] = {
    variant: family for family in FAMILIES.values() for variant in family.tiny_models
}


def tiny_spec(name: str) -> TinySpec:
    return TINY_MODELS[name].tiny_models[name]


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _word_tokenizer(part: Part, max_length: int | None):
    """A word-level fast tokenizer (the real vocabularies are files we cannot ship) with the published special
    tokens, their positions (T5: pad 0, eos 1; CLIP: start and end of text last, so CLIP's legacy pooling at the
    highest id finds the end token; Llama: the added tokens after the words, begin-of-text prepended) and the
    published `model_max_length`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    config = published_config(part.repo, f"{part.path}/tokenizer_config.json")
    special = published_config(part.repo, f"{part.path}/special_tokens_map.json")
    names = {
        name: _token(special.get(name, config.get(name)))
        for name in ("pad_token", "eos_token", "unk_token", "bos_token")
    }
    clip_style = names["eos_token"] == "<|endoftext|>"
    if clip_style:  # "!" is id 0 of CLIP's vocabulary: SDXL's second tokenizer pads with it
        tokens = ["!", *TOKENIZER_WORDS, names["bos_token"], names["eos_token"]]
        template = f"{names['bos_token']} $A {names['eos_token']}"
    elif config.get("add_bos_token"):  # Llama: words first, the added (special) tokens after them in id order
        decoder = config["added_tokens_decoder"]
        added = [decoder[i]["content"] for i in sorted(decoder, key=int)]
        tokens = list(dict.fromkeys([*TOKENIZER_WORDS, *added]))
        template = f"{names['bos_token']} $A"
    else:
        decoder = config.get("added_tokens_decoder", {})
        leading = [
            decoder[i]["content"] for i in sorted(decoder, key=int) if int(i) < 16
        ]  # pad, eos, (bos), unk as shipped
        tokens = list(dict.fromkeys([*leading, names["unk_token"], *TOKENIZER_WORDS]))
        template = f"$A {names['eos_token']}"
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if config.get("add_bos_token"):  # prompt templates' header tokens stay whole, as in the published tokenizer
        backend.add_special_tokens(added)
    specials = [t for t in (names["bos_token"], names["eos_token"]) if t and t in template]
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials]
    )
    length = config.get("model_max_length")
    length = length if isinstance(length, int) and length < 1_000_000 else max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=length, **{k: v for k, v in names.items() if v}
    )


def _component(name: str, part: Part, tokenizer=None):
    """A model built from its published config with the size fields replaced (random weights). A transformers
    text encoder's vocabulary is its tokenizer's, and special-token ids beyond it become that tokenizer's."""
    if name == "scheduler":
        return published_scheduler(part.repo)
    config = {**published_config(part.repo, f"{part.path}/config.json"), **part.shrink}
    if "_class_name" not in config:
        config["vocab_size"] = len(tokenizer)
        for role in ("bos", "eos", "pad"):
            if isinstance(config.get(f"{role}_token_id"), int) and config[f"{role}_token_id"] >= len(tokenizer):
                config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id")
    return build_from_config(config)


def build_tiny(name: str, folder: str | Path, seed: int = 0) -> Path:
    """`name` is a key of TINY_MODELS (a family, or a published variant such as wan-14b); its family's pipeline."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(sorted(TINY_MODELS))}")
    import diffusers

    spec = tiny_spec(name)
    torch.manual_seed(seed)
    components = {key: _word_tokenizer(part, spec.max_length) for key, part in spec.tokenizers.items()}
    paired = {
        key: components[key.replace("text_encoder", "tokenizer")]
        for key in spec.parts
        if key.startswith("text_encoder")
    }
    components |= {key: _component(key, part, paired.get(key)) for key, part in spec.parts.items()}
    pipe = getattr(diffusers, TINY_MODELS[name].pipeline_class_name)(**components)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)  # laid out like a hub checkpoint, for from_pretrained
    return folder


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    return build_tiny("wan", folder, seed)


TINY_CLIP = "vidtune-tiny-clip"  # registered from tasks/model_configs/ by vidtune.tasks.scoring
CAPTION_WORDS = [*"a the video of shot scene with".split(), *SCENE_WORDS]


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
