"""LoRA files from other trainers (musubi-tuner, diffusion-pipe, ai-toolkit, finetrainers, ComfyUI exports) -> a
diffusers-format adapter of the base model, the same files a vidtune run leaves in RUN/adapter/.

The key format is detected from the keys:
- `diffusers`: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (finetrainers, ai-toolkit, ours);
- `original`: `diffusion_model.<module of the original release>.lora_A/lora_B` (or `.lora_down/.lora_up`), with an
  optional `.alpha` (ComfyUI, diffusion-pipe, musubi-tuner's ComfyUI export);
- `kohya`: `lora_unet_<module, dots as underscores>.lora_down.weight` / `.lora_up.weight` + `.alpha` (musubi-tuner,
  sd-scripts).

The conversion is diffusers' own (`<Pipeline>.lora_state_dict`, which holds its converters for these formats) when
the result fits the base model: every module exists and each pair's shapes match it. Where diffusers has no
converter for the family and format, or its converter does not fit this model (its HunyuanVideo converter splits
fused single-block weights at the published width only), the family's ComfyUI module names
(`vidtune.training.comfyui`) are read backwards instead; fused modules are split row-wise into their parts, each
keeping the shared lora_A. A file neither fits is refused, naming the keys that fit no module.

A two-expert model (Wan 2.2 A14B) takes a file per expert, as musubi-tuner, ai-toolkit and ComfyUI users have them (a
"high_noise" and a "low_noise" file): the first for `transformer`, the second for `transformer_2`; both convert to
`transformer.*` keys, diffusers' prefix for either expert (see `vidtune.training.experts`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vidtune.training.adapters import comfyui_export, comfyui_file, export_comfyui, lora_modules_of, save_lora_adapter
from vidtune.training.comfyui import ComfyUIKeys, base_weight, lora_modules
from vidtune.training.experts import LOW, boundary_ratio


@dataclass
class ImportedLora:
    state: dict[str, torch.Tensor]  # `transformer.<module>.lora_A/B.weight`, scales folded into lora_B
    source_format: str
    converter: str  # "diffusers" or "vidtune"
    rank: int
    modules: int


def read_lora_file(path: str | Path, setting: str = "file") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (or a .pt/.bin/.ckpt, through `torch.load(weights_only=True)`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{setting}: {path} holds no flat tensor dict (a LoRA state dict)")
    return state


def detect_format(state: dict[str, torch.Tensor], setting: str = "file") -> str:
    keys = [k for k in state if not k.endswith(".alpha")]
    if keys and all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if keys and all(k.startswith("diffusion_model.") for k in keys):
        return "original"
    if keys and all(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    shown = ", ".join(sorted(state)[:3])
    raise ValueError(
        f"{setting}: not a LoRA in a format vidtune reads (keys like {shown}); it reads diffusers "
        "(`transformer.<module>.lora_A.weight`), original (`diffusion_model.<module>.lora_A.weight`) and kohya "
        "(`lora_unet_<module>.lora_down.weight` + `.alpha`) files"
    )


def import_lora(
    family, pipe, state: dict[str, torch.Tensor], module: str | None = None, setting: str = "file"
) -> ImportedLora:
    """`state` (diffusers, original or kohya keys) as a diffusers-keyed LoRA of `pipe`'s denoiser, or of the
    two-expert pipeline's `module` (its keys `transformer.*` either way); see the module docstring."""
    source_format = detect_format(state, setting)
    denoiser = getattr(pipe, module or family.denoiser_name)
    prefix = f"{family.denoiser_name}."
    errors = []
    try:
        converted = type(pipe).lora_state_dict({k: v.clone() for k, v in state.items()})
        converted = converted[0] if isinstance(converted, tuple) else converted
        if source_format == "diffusers" and not any(k.startswith(prefix) for k in converted):
            converted = {f"{prefix}{k}": v for k, v in converted.items()}  # a peft file without the prefix
        problems = _misfits(denoiser, converted, prefix)
        if not problems:
            return _imported(converted, source_format, "diffusers")
        errors.append(f"diffusers' converter: {problems}")
    except Exception as exc:  # noqa: BLE001  (its converters raise anything from KeyError to RuntimeError)
        errors.append(f"diffusers' converter: {type(exc).__name__}: {exc}")
    if source_format != "diffusers" and family.comfyui_keys is not None:
        converted = _from_original_names(family.comfyui_keys, denoiser, state, source_format, prefix)
        problems = _misfits(denoiser, converted, prefix)
        if not problems:
            return _imported(converted, source_format, "vidtune")
        errors.append(f"vidtune's {family.title} names: {problems}")
    raise ValueError(
        f"{setting}: a {source_format}-format LoRA that does not fit this {family.title} model ({'; '.join(errors)}); "
        "is it a LoRA of this base model?"
    )


def expert_files(denoiser_name: str, file: str, file_2: str | None) -> dict[str, tuple[str, str]]:
    """Pipeline attribute -> (the setting naming its file, the file): `file` for the denoiser (a two-expert model's
    high-noise one), `file_2` for a two-expert model's low-noise expert."""
    return {denoiser_name: ("file", file)} | ({LOW: ("file_2", file_2)} if file_2 else {})


def check_expert_files(file: str, file_2: str | None, config: dict, model: str) -> None:
    """Before any weights load, refuse naming the field: `file_2` for a model with one denoiser (`config`: its
    model_index.json); and for a two-expert one a file whose name says it is the other expert's ("low_noise" as
    `file`, "high_noise" as `file_2`, as other trainers name them), which would adapt the wrong expert silently."""
    if boundary_ratio(config) is None:
        if file_2 is not None:
            raise ValueError(
                f"file_2: {model} has one denoiser; file_2 is the low-noise expert's LoRA (transformer_2) of a "
                "two-expert model such as Wan 2.2 A14B: leave file_2 unset"
            )
        return
    for setting, path, named, other in (("file", file, "low", "file_2"), ("file_2", file_2, "high", "file")):
        if path is not None and _noise_level(Path(path).name) == named:
            alone = " (a low-noise LoRA imports with its high-noise file as file, not alone)" if not file_2 else ""
            raise ValueError(
                f"{setting}: {Path(path).name} is named as the {named}-noise expert's LoRA, but {setting} is the "
                f"{'high' if named == 'low' else 'low'}-noise expert's; give it as {other}{alone}"
            )


def _noise_level(name: str) -> str | None:
    """The expert a file name says it is for: "high" for `..._high_noise.safetensors`, "low", or None."""
    found = re.search(r"(high|low)[_\-. ]?noise", name.lower())
    return found.group(1) if found else None


def import_expert_loras(family, pipe, files: dict[str, tuple[str, str]]) -> dict[str, ImportedLora]:
    """Each file (`expert_files`) read, converted, and loaded into its denoiser of `pipe` as adapter "default"."""
    imported = {}
    for module, (setting, path) in files.items():
        imported[module] = import_lora(family, pipe, read_lora_file(path, setting), module, setting)
        into_second = {"load_into_transformer_2": True} if module == LOW else {}
        pipe.load_lora_weights(imported[module].state, adapter_name="default", **into_second)
    return imported


def imported_experts(pipe, imported: dict[str, ImportedLora]) -> str | None:
    """The `experts` a training run with these adapters would have had: none for a one-denoiser model."""
    if boundary_ratio(pipe.config) is None:
        return None
    return "both" if LOW in imported else "high"


def source_record(
    files: dict[str, tuple[str, str]], imported: dict[str, ImportedLora], digests: list[str]
) -> dict[str, str]:
    """Where each expert's LoRA came from, for vidtune.json: `imported_from`, `source_sha256`, `source_format`,
    `converter`, and the same with `_2` for `file_2`."""
    record = {}
    for (module, (setting, path)), digest in zip(files.items(), digests, strict=True):
        suffix = setting.removeprefix("file")
        record |= {
            f"imported_from{suffix}": str(Path(path).expanduser().resolve()),
            f"source_sha256{suffix}": digest,
            f"source_format{suffix}": imported[module].source_format,
            f"converter{suffix}": imported[module].converter,
        }
    return record


def save_imported_adapter(family, pipe, imported: dict[str, ImportedLora], folder: Path, info: dict) -> Path:
    """`folder` (RUN/adapter) as training leaves it: each expert's diffusers file and vidtune.json, and each
    expert's ComfyUI file where ComfyUI has a name for every module its LoRA adapts."""
    denoisers = {module: getattr(pipe, module) for module in imported}
    save_lora_adapter(family, pipe, denoisers, folder, info)
    keys = comfyui_export(family, None)
    for module, denoiser in denoisers.items():
        if keys is not None and all(keys.target(m) is not None for m in lora_modules_of(denoiser)):
            export_comfyui(family, denoiser, folder / comfyui_file(module, family.denoiser_name))
    return folder


def _imported(state: dict[str, torch.Tensor], source_format: str, converter: str) -> ImportedLora:
    ranks = [v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")]
    return ImportedLora(state, source_format, converter, max(ranks), len(ranks))


def _misfits(denoiser: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> str:
    """'' when every LoRA pair in `state` fits a module of `denoiser`; else which do not, and why."""
    modules = dict(denoiser.named_modules())
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    pairs = lora_modules(state)
    unpaired = {k.rpartition(".lora_")[0] if ".lora_" in k else k for k in state} - set(pairs)
    bad = [f"{m} (no lora_A/lora_B pair)" for m in sorted(unpaired)]
    for name, (down, up) in pairs.items():
        module = modules.get(name)
        weight = base_weight(module)
        if weight is None:
            bad.append(f"{name} (no such module)")
        elif down.shape[0] != up.shape[1] or up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            bad.append(f"{name} (lora {tuple(up.shape)} x {tuple(down.shape)} vs weight {tuple(weight.shape)})")
    if not pairs:
        bad.append("no LoRA pairs at all")
    return ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")


def _from_original_names(
    keys: ComfyUIKeys, denoiser: torch.nn.Module, state: dict[str, torch.Tensor], source_format: str, prefix: str
) -> dict[str, torch.Tensor]:
    """original/kohya keys -> diffusers keys by the family's ComfyUI names read backwards (a diffusers module name
    in a kohya file is taken as it is)."""
    fused: dict[str, dict[int, str]] = {}  # original module -> {part index: diffusers module}
    for name, module in denoiser.named_modules():
        found = keys.target(name) if hasattr(module, "weight") else None
        if found is not None:
            target, rule, match = found
            fused.setdefault(target, {})[rule.parts.index(match["part"]) if rule.parts else 0] = name
    names = {original.replace(".", "_"): original for original in fused}
    for name, _ in denoiser.named_modules():
        names.setdefault(name.replace(".", "_"), name)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem, kind = _split_key(key.removeprefix("lora_unet_" if source_format == "kohya" else "diffusion_model."))
        pairs.setdefault(names.get(stem, stem) if source_format == "kohya" else stem, {})[kind] = tensor

    out: dict[str, torch.Tensor] = {}
    for original, pair in pairs.items():
        down, up = pair.get("down"), pair.get("up")
        if down is None or up is None:
            out[f"{prefix}{original}.lora_A.weight"] = down if down is not None else up  # reported as unpaired
            continue
        up = up.float() * (float(pair["alpha"]) / down.shape[0] if "alpha" in pair else 1.0)
        modules = fused.get(original, {0: original})  # an unknown name is kept, and reported as no such module
        start = 0
        for index in sorted(modules):
            layer = denoiser.get_submodule(modules[index]) if len(modules) > 1 else None
            rows = base_weight(layer).shape[0] if layer is not None else up.shape[0]
            block, start = up[start : start + rows], start + rows
            if len(modules) == 1 or block.abs().sum() > 0:  # fused parts a file left zero were not trained
                out[f"{prefix}{modules[index]}.lora_A.weight"], out[f"{prefix}{modules[index]}.lora_B.weight"] = (
                    down,
                    block,
                )
    return out


def _split_key(body: str) -> tuple[str, str]:
    """`blocks.0.self_attn.q.lora_down.weight` -> (`blocks.0.self_attn.q`, "down")."""
    for suffix, kind in (
        (".lora_A.weight", "down"),
        (".lora_down.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora_up.weight", "up"),
        (".alpha", "alpha"),
    ):
        if body.endswith(suffix):
            return body.removesuffix(suffix), kind
    return body, body.rpartition(".")[2]
