"""Where models run outside the training loop (precompute, evaluation, inference, curation scores) and in what
precision, and whether bf16 is there for training's `mixed_precision=auto`: one policy, written once."""

from __future__ import annotations

import torch


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def placement() -> tuple[str, torch.dtype]:
    """The GPU when there is one, in bf16 where it has bf16 (else float32); otherwise the CPU in float32."""
    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", torch.bfloat16 if bf16_supported() else torch.float32
