"""LoRA files that ComfyUI loads: `diffusion_model.<ComfyUI module>.lora_A.weight` / `.lora_B.weight`.

What ComfyUI reads, from its source (comfy/lora.py, comfy/weight_adapter/lora.py):
- `model_lora_keys_unet` maps `diffusion_model.<key>` to the model weight `<key>` for every model (its "generic lora
  format"), plus per-model aliases; HunyuanVideo's also accepts the original Tencent module names (what
  diffusion-pipe writes: `img_attn_qkv`, `img_mod.linear`, `mlp.fc1`, ...) under `diffusion_model.`.
- a LoRA pair is `<x>.lora_B.weight` (up) + `<x>.lora_A.weight` (down); `<x>.alpha` is optional and without it the
  scale is 1. We fold the LoRA scale (alpha / rank) into lora_B and write no alpha: ComfyUI, diffusers and kohya-style
  loaders all read that as scale 1, so no tool can disagree about it.

ComfyUI's modules keep the names of each model's original release. diffusers maps those names to its own in its
single-file converters (`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`,
`convert_ltx_transformer_checkpoint_to_diffusers`, `convert_hunyuan_video_transformer_to_diffusers`); each family's
`ComfyUIKeys` is that map read backwards, for the modules a LoRA can target. A module with no rule is refused by
name: its keys would be ones no tool reads. Where the original model fuses several diffusers modules into one
(HunyuanVideo's `img_attn_qkv` = to_q, to_k, to_v), the LoRAs are stacked into one exact LoRA of the fused module:
lora_A rows concatenated, lora_B block-diagonal (rows of parts the adapter did not train stay zero)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Rule:
    """diffusers module path (`pattern`, a full match) -> ComfyUI module path (`target`, a `re.sub` template).
    A fused target lists its diffusers `parts` in the order of its output rows; the pattern's `part` group names
    which one matched."""

    pattern: str
    target: str
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComfyUIKeys:
    rules: tuple[Rule, ...]
    source: str  # where the original names come from, for refusals

    def __post_init__(self):
        object.__setattr__(self, "_compiled", tuple((re.compile(r.pattern), r) for r in self.rules))

    def target(self, module: str) -> tuple[str, Rule, re.Match] | None:
        """The ComfyUI module a diffusers module's LoRA goes to, or None."""
        for regex, rule in self._compiled:
            match = regex.fullmatch(module)
            if match:
                return match.expand(rule.target), rule, match
        return None

    def check(self, modules: list[str]) -> None:
        """Refuse, naming them, modules with no ComfyUI name."""
        unmapped = [m for m in modules if self.target(m) is None]
        if unmapped:
            shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
            raise ValueError(
                f"lora_targets: {shown} has no ComfyUI module name ({self.source}), so ComfyUI would ignore its "
                "keys; leave it out of lora_targets, or set export_comfyui=false to write only the diffusers file"
            )


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's `<module>.lora_A.weight` / `.lora_B.weight` pairs by module (also with diffusers' `transformer.`
    prefix stripped)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        if kind in ("A.weight", "B.weight"):
            pairs.setdefault(module, {})[kind[0]] = tensor
    return {m: (p["A"], p["B"]) for m, p in pairs.items() if set(p) == {"A", "B"}}


def comfyui_state_dict(
    keys: ComfyUIKeys, denoiser: torch.nn.Module, state: dict[str, torch.Tensor], scales: dict[str, float]
) -> dict[str, torch.Tensor]:
    """`state` (peft keys of `denoiser`'s LoRA) keyed as ComfyUI loads it, each module's scale folded into lora_B."""
    modules = lora_modules(state)
    keys.check(list(modules))
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused_sizes: dict[str, list[int]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in modules.items():
        target, rule, match = keys.target(module)
        up = (up.float() * scales[module]).to(up.dtype)
        if not rule.parts:
            out[f"{PREFIX}{target}.lora_A.weight"], out[f"{PREFIX}{target}.lora_B.weight"] = down, up
            continue
        start, end = match.span("part")
        siblings = [module[:start] + part + module[end:] for part in rule.parts]
        fused.setdefault(target, {})[rule.parts.index(match["part"])] = (down, up)
        fused_sizes[target] = [base_weight(denoiser.get_submodule(s)).shape[0] for s in siblings]
    for target, parts in fused.items():
        sizes = fused_sizes[target]
        order = sorted(parts)
        down = torch.cat([parts[i][0] for i in order])
        up = torch.zeros(sum(sizes), down.shape[0], dtype=down.dtype)
        col = 0
        for i in order:
            part_up = parts[i][1]
            row = sum(sizes[:i])
            up[row : row + sizes[i], col : col + part_up.shape[1]] = part_up
            col += part_up.shape[1]
        out[f"{PREFIX}{target}.lora_A.weight"], out[f"{PREFIX}{target}.lora_B.weight"] = down, up
    return out


def base_weight(module: torch.nn.Module | None) -> torch.Tensor | None:
    """The weight of a layer, or of the layer a peft LoRA wraps; None for modules without one."""
    return getattr(getattr(module, "base_layer", module), "weight", None)


def same_names(*names: str) -> tuple[Rule, ...]:
    """Modules ComfyUI names as diffusers does (patterns)."""
    return tuple(Rule(name, r"\g<0>") for name in names)


def renamed(prefix: str, target_prefix: str, leaves: dict[str, str]) -> tuple[Rule, ...]:
    """`<prefix>.<leaf>` -> `<target_prefix>.<renamed leaf>` (or the renamed leaf alone when `target_prefix` is
    empty); the prefixes may hold groups (`\\1` in the target)."""
    return tuple(
        Rule(rf"{prefix}\.{re.escape(leaf)}", f"{target_prefix}.{new}" if target_prefix else new)
        for leaf, new in leaves.items()
    )
