"""The config files that published checkpoints ship, stored in the package under `model_configs/<org>/<repo>/`
with the same relative paths as on the hub (README.md there says where each came from). Tiny models are these
configs with only size fields shrunk (each family declares its `TinySpec`s with the records below); tests build
every shipped scheduler from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ROOT = Path(__file__).parent / "model_configs"
RETIRED_KEYS = frozenset({"clip_output"})  # published config keys the installed diffusers no longer takes


def published_folder(repo: str) -> Path:
    folder = CONFIG_ROOT / repo
    if not folder.is_dir():
        known = sorted(str(p.parent.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.glob("*/*/*.json")) or ["none"]
        raise ValueError(f"no stored configs for {repo}; stored: {', '.join(sorted(set(known)))}")
    return folder


def published_config(repo: str, path: str) -> dict:
    """One stored file, e.g. `published_config("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer/config.json")`."""
    return json.loads((published_folder(repo) / path).read_text())


def published_scheduler_config(repo: str) -> dict:
    return published_config(repo, "scheduler/scheduler_config.json")


def build_from_config(config: dict):
    """A model (random weights) from a config file's contents: a diffusers class named by `_class_name`, or the
    transformers class in `architectures`. Under `torch.device("meta")` a full-size one costs no memory."""
    if "_class_name" in config:
        import diffusers

        # Wan 2.2's published VAE key that diffusers later removed (it always clamps now): dropped, not warned about.
        config = {key: value for key, value in config.items() if key not in RETIRED_KEYS}
        return getattr(diffusers, config["_class_name"]).from_config(config)
    import transformers

    return getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))


def published_scheduler(repo: str):
    """The scheduler as `from_pretrained` builds it from the stored `scheduler_config.json`."""
    import diffusers

    config = published_scheduler_config(repo)
    return getattr(diffusers, config["_class_name"]).from_config(config)


@dataclass(frozen=True)
class Part:
    """One pipeline component: the published config at `repo`/`path`, with `shrink` replacing size fields."""

    repo: str
    path: str
    shrink: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TinySpec:
    """A tiny random model of one published checkpoint: its models and scheduler (`parts`) and tokenizers, each
    from the stored files. The pipeline class is the family's."""

    parts: dict[str, Part]
    tokenizers: dict[str, Part]  # tokenizer component -> its published tokenizer folder
    max_length: int | None = None  # the pipeline's own prompt length when the tokenizer config sets none
    index: str | None = None  # the repo whose model_index.json sets the pipeline's own arguments (Wan 2.2's)
    processors: dict[str, Part] = field(default_factory=dict)  # image processors: component -> its published folder

    def pipeline_arguments(self) -> dict:
        """The published model_index.json's settings that are not components (`boundary_ratio`,
        `expand_timesteps`), as the pipeline's `__init__` takes them."""
        if self.index is None:
            return {}
        index = published_config(self.index, "model_index.json")
        return {key: value for key, value in index.items() if not key.startswith("_") and not isinstance(value, list)}


TEXT = 32  # every tiny text encoder's width
T5_SHRINK = {"d_model": TEXT, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
CLIP_SHRINK = {
    "hidden_size": TEXT,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT,
}
VAE_2D_SHRINK = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 2}
