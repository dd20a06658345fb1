"""Check the models a curate run needs before any video is decoded, naming the parameter that is wrong."""

from __future__ import annotations

from pathlib import Path

from vidtune.tasks.aesthetic import AestheticHeadError
from vidtune.tasks.annotate import Annotators
from vidtune.tasks.captions import CaptionParams, load_caption_mapping
from vidtune.tasks.scoring import ScoreParams

WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}


class ModelSetupError(ValueError):
    """A model parameter points at something that cannot be loaded."""


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).suffix in WEIGHT_SUFFIXES or Path(value).exists()


def check_models(captions: CaptionParams, scores: ScoreParams) -> None:
    if scores.clip and scores.clip_pretrained and _looks_local(scores.clip_pretrained):
        if not Path(scores.clip_pretrained).expanduser().is_file():
            raise ModelSetupError(f"scores.clip_pretrained: no such weights file: {scores.clip_pretrained}")
    if captions.mode == "vlm" and _looks_local(captions.vlm_model):
        folder = Path(captions.vlm_model).expanduser()
        if not folder.is_dir():
            raise ModelSetupError(f"captions.vlm_model: no such folder: {captions.vlm_model}")
        if not (folder / "config.json").is_file():
            raise ModelSetupError(
                f"captions.vlm_model: {captions.vlm_model} is not a transformers model folder (no config.json)"
            )
    if captions.sidecar_file and not captions.sidecar_file.startswith(("s3://", "gs://", "memory://", "http")):
        if not Path(captions.sidecar_file).expanduser().is_file():
            raise ModelSetupError(f"captions.sidecar_file: no such file: {captions.sidecar_file}")
    if captions.sidecar_file:
        try:
            load_caption_mapping(captions.sidecar_file)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise ModelSetupError(f"captions.sidecar_file: {exc}") from exc
    _load(Annotators.load, captions, scores)


def _load(load, captions: CaptionParams, scores: ScoreParams) -> None:
    try:
        load(captions.model_copy(update={"mode": "template"}), scores)
    except AestheticHeadError as exc:  # its own message names scores.aesthetic_head and the fix
        raise ModelSetupError(str(exc)) from exc
    except Exception as exc:
        raise ModelSetupError(
            f"scores.clip_model/clip_pretrained: cannot load open_clip {scores.clip_model!r} with "
            f"{scores.clip_pretrained!r}: {exc}. Without network access, pass a local weights file "
            "(--set scores.clip_pretrained=PATH) or turn the score off (--set scores.clip=false)."
        ) from exc
    if captions.mode == "vlm":
        try:
            load(captions, scores.model_copy(update={"clip": False}))
        except Exception as exc:
            raise ModelSetupError(f"captions.vlm_model: cannot load {captions.vlm_model!r}: {exc}") from exc
