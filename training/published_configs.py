"""The config files that published checkpoints ship, stored in the package under `model_configs/<org>/<repo>/`
with the same relative paths as on the hub (README.md there says where each came from). Tiny models are these
configs with only size fields shrunk; tests build every shipped scheduler from them."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_ROOT = Path(__file__).parent / "model_configs"


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

        return getattr(diffusers, config["_class_name"]).from_config(config)
    import transformers

    return getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))


def published_scheduler(repo: str):
    """The scheduler as `from_pretrained` builds it from the stored `scheduler_config.json`."""
    import diffusers

    config = published_scheduler_config(repo)
    return getattr(diffusers, config["_class_name"]).from_config(config)
