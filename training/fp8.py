"""Frozen denoiser weights stored in float8, dequantised per layer in forward (`fp8: cast | scaled`).

- `cast`: diffusers' layerwise casting, an unscaled cast to E4M3. On weights of N(0, 0.01) about 6 % relative
  error, and the smallest weights flush to zero.
- `scaled`: E4M3 with one float32 scale per block of `BLOCK` consecutive input weights (per row when a row does not
  split into such blocks), the block's largest magnitude mapped to E4M3's largest (448). About half the error of
  `cast`, for 1/16 more bytes (a 4-byte scale per 64 one-byte values). It is a parametrization of each
  `Linear.weight` (`torch.nn.utils.parametrize`), so the weight is rebuilt in the compute dtype on each use and
  the stored tensor is the float8 one (what block swap moves).

What stays in the compute dtype, as the trainers that do this keep it: every `Linear` outside the transformer
blocks (embeddings, the head), norms and modulation (`norm*` modules, `scale_shift_table`), and all biases.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

BLOCK = 64
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


class ScaledFp8(torch.nn.Module):
    """The parametrization: `right_inverse` quantises a weight into (E4M3 values, float32 scale per block), which
    the module keeps as `parametrizations.weight.original0` / `original1`; `forward` dequantises them."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = weight.detach().float().unflatten(-1, (-1, _block(weight.shape[-1])))
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
        return (blocks / scale).to(E4M3).flatten(-2), scale

    def forward(self, stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        blocks = stored.to(torch.float32).unflatten(-1, (scale.shape[-2], -1))
        return (blocks * scale).flatten(-2).to(self.dtype)


def _block(columns: int) -> int:
    return next((b for b in (BLOCK, 32, 16) if columns % b == 0), columns)


def quantized_linears(denoiser: torch.nn.Module, block_lists: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The `Linear`s that `scaled` stores in float8: those inside the transformer blocks, except norms' and
    modulation's."""
    found = []
    for list_name in block_lists:
        for name, module in getattr(denoiser, list_name).named_modules():
            if isinstance(module, torch.nn.Linear) and not any(part.startswith("norm") for part in name.split(".")):
                found.append((f"{list_name}.{name}", module))
    return found


def store_scaled_fp8(denoiser: torch.nn.Module, block_lists: tuple[str, ...], compute_dtype: torch.dtype) -> int:
    """Store the blocks' frozen `Linear` weights as scaled E4M3 (before an adapter is added); returns how many."""
    linears = quantized_linears(denoiser, block_lists)
    for _, linear in linears:
        parametrize.register_parametrization(linear, "weight", ScaledFp8(compute_dtype), unsafe=True)
        linear.parametrizations.weight.requires_grad_(False)
    return len(linears)


def store_fp8(denoiser: torch.nn.Module, mode: str, block_lists: tuple[str, ...], compute_dtype: torch.dtype) -> None:
    """`mode` "cast" (diffusers layerwise casting of every layer it casts) or "scaled" (`store_scaled_fp8`)."""
    if mode == "cast":
        denoiser.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=compute_dtype)
    elif mode == "scaled":
        if not block_lists:
            raise ValueError("fp8: scaled needs a denoiser made of transformer blocks; use fp8=cast")
        store_scaled_fp8(denoiser, block_lists, compute_dtype)
