"""What training leaves behind: a LoRA in diffusers format (loadable with `pipe.load_lora_weights`, with its
rank/alpha/targets in the safetensors metadata) and, for families ComfyUI loads, the same LoRA keyed for ComfyUI;
or a full pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidtune.training.comfyui import ComfyUIKeys, comfyui_state_dict
from vidtune.training.experts import ADAPTER_FILES as EXPERT_FILES
from vidtune.training.experts import LOW
from vidtune.training.families import ModelFamily
from vidtune.training.files import atomic_dir, atomic_path, write_json_atomic

ADAPTER_FILE = EXPERT_FILES["transformer"]  # "pytorch_lora_weights.safetensors", diffusers' default
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


def adapter_file(module: str, denoiser_name: str) -> str:
    """The file a denoiser's LoRA is saved in: diffusers' default name, or a two-expert model's second file."""
    return ADAPTER_FILE if module == denoiser_name else EXPERT_FILES[module]


def comfyui_file(module: str, denoiser_name: str) -> str:
    return COMFYUI_FILE if module == denoiser_name else f"comfyui_lora_{module}.safetensors"


def save_lora_adapter(family: ModelFamily, pipe, denoisers: dict[str, torch.nn.Module], out_dir: Path, info: dict):
    """Per trained denoiser (pipeline attribute -> module) its LoRA file, diffusers keys + LoRA metadata:
    `out_dir/pytorch_lora_weights.safetensors`, and for Wan 2.2 A14B's low-noise expert
    `pytorch_lora_weights_transformer_2.safetensors` (also `transformer.*` keys, see `vidtune.training.experts`);
    and `vidtune.json`."""
    configs = {module: _json_safe(d.peft_config["default"].to_dict()) for module, d in denoisers.items()}
    with atomic_dir(out_dir) as tmp:
        for module, denoiser in denoisers.items():
            type(pipe).save_lora_weights(
                tmp,
                weight_name=adapter_file(module, family.denoiser_name),
                **{  # one expert's keys are `transformer.*` too: diffusers loads either file into either expert
                    f"{family.denoiser_name}_lora_layers": lora_state_dict(denoiser),
                    f"{family.denoiser_name}_lora_adapter_metadata": configs[module],
                },
            )
        config = next(iter(configs.values()))
        files = {module: adapter_file(module, family.denoiser_name) for module in denoisers}
        write_json_atomic(
            tmp / INFO_FILE,
            {
                **info,
                "rank": config["r"],
                "alpha": config["lora_alpha"],
                "targets": config["target_modules"],
                "adapter_files": files,  # pipeline attribute -> its LoRA file
            },
        )
    return out_dir


def load_adapter(pipe, folder: str | Path, adapter_name: str = "default", scale: float | None = None) -> list[str]:
    """Load a saved adapter into `pipe` (both files of a two-expert LoRA: the second into `transformer_2`),
    optionally at `scale`; returns the pipeline attributes that received a LoRA."""
    folder, loaded = Path(folder), []
    if (folder / ADAPTER_FILE).is_file():
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
        loaded.append("transformer" if hasattr(pipe, "transformer") else "unet")
    if (folder / EXPERT_FILES[LOW]).is_file():
        if getattr(pipe, LOW, None) is None:
            raise ValueError(
                f"adapter: {folder} holds a LoRA for a second expert (transformer_2), but this model has none; "
                "load it on the Wan 2.2 A14B model it was trained on"
            )
        pipe.load_lora_weights(
            str(folder), weight_name=EXPERT_FILES[LOW], adapter_name=adapter_name, load_into_transformer_2=True
        )
        loaded.append(LOW)
    if not loaded:
        raise FileNotFoundError(f"adapter: {folder} has no {ADAPTER_FILE} (nor {EXPERT_FILES[LOW]})")
    if scale is not None:
        for module in loaded:
            getattr(pipe, module).set_adapters([adapter_name], [scale])
    return loaded


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
