"""Choosing what trains: all of a denoiser, or the parameters whose names match a pattern."""

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
        raise ValueError(f"no parameter name matches {pattern!r} (e.g. {next(iter(dict(module.named_parameters())), '')})")
    return chosen
