"""What training leaves behind: a LoRA in diffusers format (loadable with `pipe.load_lora_weights`, with its
rank/alpha/targets in the safetensors metadata) and, for families ComfyUI loads, the same LoRA keyed for ComfyUI;
or a full pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidtune.training.comfyui import ComfyUIKeys, comfyui_state_dict
from vidtune.training.families import ModelFamily
from vidtune.training.files import atomic_dir, atomic_path, write_json_atomic

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "comfyui_lora.safetensors"
INFO_FILE = "vidtune.json"


def _json_safe(value):
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(denoiser).items()}


def save_lora_adapter(family: ModelFamily, pipe, denoiser: torch.nn.Module, out_dir: Path, info: dict) -> Path:
    """`out_dir/pytorch_lora_weights.safetensors` (diffusers keys + LoRA metadata) and `vidtune.json`."""
    config = _json_safe(denoiser.peft_config["default"].to_dict())
    with atomic_dir(out_dir) as tmp:
        type(pipe).save_lora_weights(
            tmp,
            **{
                f"{family.denoiser_name}_lora_layers": lora_state_dict(denoiser),
                f"{family.denoiser_name}_lora_adapter_metadata": config,
            },
        )
        write_json_atomic(
            tmp / INFO_FILE,
            {**info, "rank": config["r"], "alpha": config["lora_alpha"], "targets": config["target_modules"]},
        )
    return out_dir


def comfyui_export(family: ModelFamily, requested: bool | None) -> ComfyUIKeys | None:
    """The family's ComfyUI module names when its ComfyUI file is written: by default for every family ComfyUI
    loads; `export_comfyui=true` refuses one it does not, `false` writes none."""
    if requested is False:
        return None
    if family.comfyui_keys is None:
        if requested:
            from vidtune.training.families import FAMILIES

            loads = ", ".join(f.name for f in FAMILIES.values() if f.comfyui_keys is not None)
            raise ValueError(
                f"export_comfyui: ComfyUI has no LoRA loader for {family.title} (it loads {loads}); "
                "leave export_comfyui unset to write only the diffusers file"
            )
        return None
    return family.comfyui_keys


def lora_modules_of(denoiser: torch.nn.Module) -> dict[str, float]:
    """The modules peft put a LoRA on, with the scale (alpha / rank) each applies (of its one adapter)."""
    return {
        name: next(iter(module.scaling.values()))
        for name, module in denoiser.named_modules()
        if getattr(module, "scaling", None) and hasattr(module, "lora_A")
    }


def export_comfyui(family: ModelFamily, denoiser: torch.nn.Module, path: Path) -> Path:
    """The LoRA keyed as ComfyUI loads it (see `vidtune.training.comfyui`)."""
    state = comfyui_state_dict(family.comfyui_keys, denoiser, lora_state_dict(denoiser), lora_modules_of(denoiser))
    metadata = {"format": "comfyui", "family": family.name, "scale": "folded into lora_B (no alpha: scale 1)"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def save_full_model(pipe, out_dir: Path, info: dict) -> Path:
    """The whole pipeline with the fine-tuned denoiser, loadable with `from_pretrained(out_dir)`."""
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / INFO_FILE, info)
    return out_dir


def read_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO_FILE).read_text())
