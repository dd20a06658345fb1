"""Model families (subclasses of `ModelFamily`), their registry, and detection from a model's `model_index.json`.
A new family is one module and one line in `FAMILIES`."""

from __future__ import annotations

import json
from pathlib import Path

from vidtune.training.families.animatediff import AnimateDiffFamily, AnimateDiffSDXLFamily
from vidtune.training.families.base import ModelFamily, TextEmbeddings, TrainingInputs, model_file
from vidtune.training.families.cogvideox import CogVideoXFamily
from vidtune.training.families.hunyuan_video import HunyuanVideoFamily
from vidtune.training.families.ltx import LtxFamily
from vidtune.training.families.ltx_i2v import LtxImageToVideoFamily
from vidtune.training.families.wan import WanFamily
from vidtune.training.families.wan_i2v import WanImageToVideoFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        WanFamily(),
        WanImageToVideoFamily(),
        LtxFamily(),
        LtxImageToVideoFamily(),
        CogVideoXFamily(),
        HunyuanVideoFamily(),
        AnimateDiffFamily(),
        AnimateDiffSDXLFamily(),
    )
}  # one line per family

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "TextEmbeddings",
    "TrainingInputs",
    "detect_family",
    "get_family",
    "model_index",
]


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _model_index(model: str | Path) -> Path:
    """`model_index.json` of a local diffusers folder, or of a hub id (fetched then: only that small file)."""
    index = model_file(model, "model_index.json")
    if index is None:
        raise ValueError(f"model: {model} is not a diffusers model folder (no model_index.json)")
    return index


def model_index(model: str | Path) -> dict:
    """A diffusers model's `model_index.json` (local folder or hub id): its pipeline class and settings."""
    return json.loads(_model_index(model).read_text())


def detect_family(model_folder: str | Path) -> ModelFamily:
    """The family whose pipeline class a diffusers model (local folder or hub id) declares."""
    index = _model_index(model_folder)
    pipeline = json.loads(index.read_text()).get("_class_name")
    for family in FAMILIES.values():
        if family.pipeline_class_name == pipeline:
            return family
    supported = ", ".join(f"{f.name} ({f.pipeline_class_name})" for f in FAMILIES.values())
    raise ValueError(f"model: {model_folder} is a {pipeline}, which no family handles; supported: {supported}")
