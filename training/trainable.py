"""Choosing what trains (a LoRA, all of a denoiser, or the parameters whose names match a pattern) and the
optimizer that trains it."""

from __future__ import annotations

import re

import torch


def select_trainable(module: torch.nn.Module, pattern: str | None = None) -> list[torch.nn.Parameter]:
    """Freeze `module`, then unfreeze every parameter (all when `pattern` is None) whose name matches `pattern`."""
    regex = re.compile(pattern) if pattern else None
    chosen = []
    for name, param in module.named_parameters():
        param.requires_grad_(regex is None or bool(regex.search(name)))
        if param.requires_grad:
            chosen.append(param)
    if not chosen:
        raise ValueError(
            f"no parameter name matches {pattern!r} (e.g. {next(iter(dict(module.named_parameters())), '')})"
        )
    return chosen


def make_trainable(family, denoiser: torch.nn.Module, params) -> dict[str, torch.nn.Parameter]:
    """Freeze the denoiser, then add a LoRA (training_type=lora) or unfreeze all or a subset of it (full).
    Trained parameters are kept in float32 whatever the storage dtype of the rest (mixed-precision master weights)."""
    if params.training_type == "lora":
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        targets = params.lora_targets or list(family.default_lora_targets)
        denoiser.add_adapter(
            LoraConfig(
                r=params.rank,
                lora_alpha=params.alpha or params.rank,
                lora_dropout=params.lora_dropout,
                target_modules=targets,
                init_lora_weights=True,
            )
        )
    else:
        pattern = family.full_subsets.get(params.full_modules, params.full_modules) if params.full_modules else None
        select_trainable(denoiser, pattern)
    trainable = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
    for param in trainable.values():
        param.data = param.data.float()
    if params.training_type == "lora":
        _init_lora_in_fp32(denoiser)
    return trainable


def _init_lora_in_fp32(denoiser: torch.nn.Module) -> None:
    """peft makes the new LoRA in its base layer's dtype (float8 with fp8 storage: A starts with a few dozen distinct
    magnitudes; bf16: rounded), so it is initialised again now that it is float32: A as nn.Linear's, B zero."""
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)


def make_optimizer(params_list: list[torch.nn.Parameter], params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (also for "auto", which older configs name), or 8-bit AdamW (bitsandbytes) when asked for: what trains
    never depends on what happens to be installed."""
    kind = "adamw" if params.optimizer == "auto" else params.optimizer
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes) and a GPU") from exc
        return bnb.optim.AdamW8bit(params_list, lr=params.learning_rate, weight_decay=params.weight_decay)
    return torch.optim.AdamW(params_list, lr=params.learning_rate, weight_decay=params.weight_decay)
