"""What training leaves behind: a LoRA in diffusers format (loadable with `pipe.load_lora_weights`, with its
rank/alpha/targets in the safetensors metadata), optionally re-keyed for ComfyUI; or a full pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def check_comfyui_export(family: ModelFamily) -> tuple[tuple[str, str], ...]:
    """The family's ComfyUI key renames, or a refusal naming the families that have them."""
    if family.comfyui_renames is None:
        from vidtune.training.families import FAMILIES

        available = ", ".join(f.name for f in FAMILIES.values() if f.comfyui_renames is not None)
        raise ValueError(f"export_comfyui: no ComfyUI key mapping for {family.name} yet (available: {available})")
    return family.comfyui_renames


def export_comfyui(family: ModelFamily, state: dict[str, torch.Tensor], alpha: float, path: Path) -> Path:
    """The LoRA keyed as ComfyUI loads it: `diffusion_model.<original module>.lora_A/B.weight` plus `.alpha`."""
    renames = check_comfyui_export(family)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")  # "blocks.0.attn1.to_q", "A.weight"
        module = f".{module}."
        for old, new in renames:
            module = module.replace(old, new)
        module = f"diffusion_model{module}".rstrip(".")
        out[f"{module}.lora_{kind}"] = tensor
        out[f"{module}.alpha"] = torch.tensor(float(alpha))
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={"format": "comfyui", "alpha": str(alpha), "family": family.name})
    return path


def save_full_model(pipe, out_dir: Path, info: dict) -> Path:
    """The whole pipeline with the fine-tuned denoiser, loadable with `from_pretrained(out_dir)`."""
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / INFO_FILE, info)
    return out_dir


def read_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO_FILE).read_text())
