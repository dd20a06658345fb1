"""A batch as the denoiser takes it: cached latents and prompt embeddings moved to the denoiser's device, or (on
the fly, data_source=shards) the video and captions encoded now into what precompute would have cached. Shared by
the training loss and the fixed held-out evaluation."""

from __future__ import annotations

import torch

from vidtune.training.families import ModelFamily, TextEmbeddings


def _text_to(text: dict[str, torch.Tensor], device, dtype) -> TextEmbeddings:
    moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in text.items()}
    return TextEmbeddings(moved["embeds"], moved.get("mask"), moved.get("pooled"))


def encode_batch(
    family: ModelFamily, pipe, batch: dict, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, TextEmbeddings, dict[str, torch.Tensor]]:
    """(latents as `family.encode_video` gives them, prompt embeddings, conditioning tensors) of `batch` on
    `device`."""
    if "latents" in batch:
        latents, text = batch["latents"].to(device, dtype), _text_to(batch["text"], device, dtype)
        condition = batch.get("condition", {})
    else:  # on the fly: what precompute would have cached
        video = batch["video"].to(device)
        latents, text = family.encode_video(pipe, video), family.encode_prompts(pipe, batch["captions"])
        latents, condition = latents.to(dtype), family.encode_condition(pipe, video)
    return latents, text, {name: c.to(device, dtype) for name, c in condition.items()}
