"""Validation loss on held-out clips at fixed noise and timesteps: the same draws for every model compared, so
the difference is the model, whatever the model."""

from __future__ import annotations

import torch

from vidtune.training.families import ModelFamily
from vidtune.training.trainer import batch_loss


def heldout_loss(
    family: ModelFamily, pipe, batches: list[dict], seed: int = 0, draws: int = 4, objective=None
) -> float:
    """Mean denoising loss over `batches` x `draws` seeded noise/timestep draws (under the run's `objective`);
    global RNG left as it was."""
    denoiser = getattr(pipe, family.denoiser_name)
    dtype = next(denoiser.parameters()).dtype
    losses = []
    devices = [pipe.device] if pipe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for index, batch in enumerate(batches):
            for draw in range(draws):
                torch.manual_seed(seed + 1000 * index + draw)
                # No denoiser given: the model's own, for Wan 2.2 A14B the expert its pipeline uses at each timestep.
                losses.append(batch_loss(family, pipe, None, batch, dtype, objective).item())
    return sum(losses) / len(losses)
