"""Tiny random models of the published checkpoints: each component is built from the checkpoint's own config
file (stored in `training/model_configs/<org>/<repo>/`) with only size fields shrunk (layers, heads, widths,
vocabulary, norm groups that must divide a width), and saved with `save_pretrained`. Schedulers, VAE
normalisation, compression ratios, RoPE and positional-table lengths, patch sizes and tokenizer lengths stay as
shipped, so the only difference between what tests train and what users train is size. Nothing is downloaded.

The output folder has the layout of a hub checkpoint (`model_index.json`, `transformer/` or `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) and loads with `DiffusionPipeline.from_pretrained(folder)`.

The curation models (a CLIP of open_clip's classes, a BLIP captioner and a Qwen2.5-VL video captioner) are here
too: saved as users' models are (an open_clip weights file; transformers folders from `save_pretrained`) and
loaded through the same code.
"""

from __future__ import annotations

import json
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
    if "_class_name" not in config and tokenizer is not None:
        config["vocab_size"] = len(tokenizer)
        for role in ("bos", "eos", "pad"):
            if isinstance(config.get(f"{role}_token_id"), int) and config[f"{role}_token_id"] >= len(tokenizer):
                config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id")
    return build_from_config(config)


def _image_processor(part: Part):
    """An image processor as shipped (`preprocessor_config.json`): nothing in it is a size to shrink."""
    import transformers

    config = published_config(part.repo, f"{part.path}/preprocessor_config.json")
    return getattr(transformers, config["image_processor_type"]).from_dict(config)


def build_tiny(name: str, folder: str | Path, seed: int = 0) -> Path:
    """`name` is a key of TINY_MODELS (a family, or a published variant such as wan-14b or wan2.2-t2v-a14b); its family's pipeline."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(sorted(TINY_MODELS))}")
    import diffusers

    from vidtune.training.progress_lines import quiet_library_bars

    quiet_library_bars()  # in a log file, no carriage-return bars of "Writing model shards"

    spec = tiny_spec(name)
    torch.manual_seed(seed)
    components = {key: _word_tokenizer(part, spec.max_length) for key, part in spec.tokenizers.items()}
    paired = {
        key: components[key.replace("text_encoder", "tokenizer")]
        for key in spec.parts
        if key.startswith("text_encoder")
    }
    components |= {key: _component(key, part, paired.get(key)) for key, part in spec.parts.items()}
    components |= {key: _image_processor(part) for key, part in spec.processors.items()}
    pipe = getattr(diffusers, TINY_MODELS[name].pipeline_class_name)(**components, **spec.pipeline_arguments())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)  # laid out like a hub checkpoint, for from_pretrained
    return folder


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    return build_tiny("wan", folder, seed)


TINY_CLIP = "vidtune-tiny-clip"  # registered from model_configs/open_clip/ by vidtune.training.clip_configs
CAPTION_WORDS = [*"a the video of shot scene with".split(), *SCENE_WORDS]


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Random weights for the `vidtune-tiny-clip` open_clip config, saved as safetensors at `path`."""
    import open_clip

    from vidtune.training.clip_configs import register_model_configs

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


QWEN_VL_REPO = "Qwen/Qwen2.5-VL-3B-Instruct"
QWEN_WIDTH = 32
QWEN_VL_SHRINK = {  # head_dim 128 -> 16, so mrope_section [16, 24, 24] (sums to head_dim / 2) scales by 1/8
    "hidden_size": QWEN_WIDTH,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}
QWEN_VISION_SHRINK = {  # one full-attention block last, as each group of 8 ends in the published [7, 15, 23, 31]
    "depth": 2,
    "hidden_size": QWEN_WIDTH,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": QWEN_WIDTH,
    "fullatt_block_indexes": [1],
}


def _qwen_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, merges learnt here from a few words (the published vocab.json
    and merges.txt are files we cannot ship), then the published added tokens in their published order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    config = published_config(QWEN_VL_REPO, "tokenizer_config.json")
    decoder = config["added_tokens_decoder"]
    added = [decoder[i] for i in sorted(decoder, key=int)]
    pipeline = Qwen2Tokenizer()._tokenizer  # Qwen2's normalizer, pre-tokenizer and decoder around an empty BPE
    learner = Tokenizer(models.BPE())
    learner.normalizer, learner.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte stays encodable, as in the published vocab
    words = [*CAPTION_WORDS, *"system you are a helpful assistant user describe this video in one sentence".split()]
    learner.train_from_iterator(
        [" ".join(words)] * 4,
        trainers.BpeTrainer(vocab_size=len(alphabet) + 200, initial_alphabet=alphabet, show_progress=False),
    )
    model = json.loads(learner.to_str())["model"]
    vocab = {**model["vocab"], **{token["content"]: len(model["vocab"]) + k for k, token in enumerate(added)}}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        unk_token=config["unk_token"],
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        errors=config["errors"],
        model_max_length=config["model_max_length"],
        extra_special_tokens=config["additional_special_tokens"],
    )
    tokenizer.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False) for t in added])
    return tokenizer


def build_tiny_video_captioner(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL (a video VLM): the published config with only widths, depths and heads shrunk
    (the vocabulary and special-token ids become the tiny tokenizer's), the published processor settings and chat
    template, saved with `save_pretrained` so AutoProcessor / AutoModelForImageTextToText load it. The published
    `min_pixels` is 56x56, so tests' 56x56 frames pass through unscaled: 4x4 patches, 2x2 tokens per 2 frames."""
    import transformers

    folder = Path(folder)
    tokenizer = _qwen_tokenizer()
    config = {**published_config(QWEN_VL_REPO, "config.json"), **QWEN_VL_SHRINK}
    config["vision_config"] = {**config["vision_config"], **QWEN_VISION_SHRINK}
    config["vocab_size"] = len(tokenizer)
    published_tokens = published_config(QWEN_VL_REPO, "tokenizer_config.json")["added_tokens_decoder"]
    for key in [k for k in config if k.endswith("token_id")]:  # a published id -> its token -> the tiny id
        config[key] = tokenizer.convert_tokens_to_ids(published_tokens[str(config[key])]["content"])
    torch.manual_seed(seed)
    model = build_from_config(config)
    processing = published_config(QWEN_VL_REPO, "preprocessor_config.json")
    settings = {k: v for k, v in processing.items() if k not in ("image_processor_type", "processor_class")}
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=getattr(transformers, processing["image_processor_type"])(**settings),
        # the repo ships no video config: from_pretrained builds the video processor from preprocessor_config.json
        video_processor=transformers.Qwen2VLVideoProcessor(**settings),
        tokenizer=tokenizer,
        chat_template=published_config(QWEN_VL_REPO, "chat_template.json")["chat_template"],
    )
    # An untrained model would stop at once or spell bytes; make it say a few word pieces, as a trained one does.
    model.generation_config.min_new_tokens = 3
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    added = {tokenizer.convert_tokens_to_ids(t["content"]) for t in published_tokens.values()}
    model.generation_config.suppress_tokens = sorted(
        i for token, i in tokenizer.get_vocab().items() if len(token) == 1 or i in added - {tokenizer.eos_token_id}
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
