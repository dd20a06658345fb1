"""The fixed evaluation objective: one held-out loss that measures every run alike, whatever it trained with.

- Noise levels on a stratified grid over the whole range, in the family's own parameterisation (flow: sigma in
  [0, 1]; VP: the fraction of the checkpoint's timesteps): draw d of D sits in [d/D, (d+1)/D) at an offset fixed
  per clip, so every band of noise is measured equally and no two clips share the exact levels.
- The noise and the posterior sample of draw d of a clip are fixed by (seed, clip id, d): two runs measured on the
  same held-out clips get the very same draws, in any order, so their per-draw losses pair.
- No loss weighting, and none of the run's settings (timestep_sampling, flow_shift, min/max_timestep,
  loss_weighting, snr_gamma): a run trained at high noise only is still measured at every level.

Returns every draw's loss (clip, level, loss), so callers can pair two models draw by draw (`evaluation.gate`).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, replace

import torch

from vidtune.training.batches import encode_batch
from vidtune.training.families import ModelFamily
from vidtune.training.families.objectives import denoising_loss

BANDS = {"low": (0.0, 1 / 3), "mid": (1 / 3, 2 / 3), "high": (2 / 3, 1.0 + 1e-9)}  # level thirds


@dataclass(frozen=True)
class HeldoutLosses:
    clip_ids: list[str]  # one entry per draw
    levels: list[float]  # in [0, 1): the noise level of the draw
    losses: list[float]

    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)

    def band_of(self, level: float) -> str:
        return next(name for name, (low, high) in BANDS.items() if low <= level < high)

    def band_means(self) -> dict[str, float]:
        out = {}
        for name in BANDS:
            values = [loss for level, loss in zip(self.levels, self.losses) if self.band_of(level) == name]
            if values:
                out[name] = sum(values) / len(values)
        return out

    def standard_error(self) -> float:
        """Of the mean, with clips as the independent units (a clip's draws share its content)."""
        per_clip: dict[str, list[float]] = {}
        for clip, loss in zip(self.clip_ids, self.losses):
            per_clip.setdefault(clip, []).append(loss)
        means = [sum(v) / len(v) for v in per_clip.values()]
        if len(means) < 2:
            return math.nan
        average = sum(means) / len(means)
        return math.sqrt(sum((m - average) ** 2 for m in means) / (len(means) - 1) / len(means))

    def as_dict(self) -> dict:
        return asdict(self)


def _draw_seed(seed: int, clip_id: str, draw: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{clip_id}/{draw}".encode()).digest()[:8], "little")


def grid_levels(clip_id: str, draws: int, seed: int = 0) -> list[float]:
    """Draw d's level in [d/draws, (d+1)/draws), at an offset fixed per clip."""
    offset = random.Random(f"{seed}/{clip_id}/offset").random()
    return [(draw + offset) / draws for draw in range(draws)]


def measured_on(device, dtype) -> str:
    """Where a held-out measurement ran ("cuda/bfloat16"): the draws are the same anywhere, the model's arithmetic
    is not, so two models pair exactly only when measured alike."""
    return f"{torch.device(device).type}/{str(dtype).removeprefix('torch.')}"


def heldout_losses(family: ModelFamily, pipe, batches: list[dict], draws: int = 16, seed: int = 0) -> HeldoutLosses:
    """Every draw's unweighted denoising loss over one-clip `batches` (from `read_clips`); the global RNG is not
    used."""
    denoiser = getattr(pipe, family.denoiser_name)
    dtype, device = next(denoiser.parameters()).dtype, denoiser.device
    objective = family.objective(pipe)  # the model's own parameterisation; no training settings apply
    clip_ids, levels, losses = [], [], []
    with torch.no_grad():
        for batch in batches:
            (clip_id,) = batch["clip_ids"]
            encoded, text, condition = encode_batch(family, pipe, batch, dtype, device)
            # The draws from the latents as cached (or encoded), in fp32 on the CPU: the same numbers on any device
            # and in any weight dtype, so measurements made on two machines pair.
            exact = batch["latents"] if "latents" in batch else encoded
            exact = exact.detach().to("cpu", torch.float32)
            for draw, level in enumerate(grid_levels(clip_id, draws, seed)):
                generator = torch.Generator().manual_seed(_draw_seed(seed, clip_id, draw))
                clean = family.sample_latents(pipe, exact, generator)  # the posterior sample (or mean), then the noise
                noise = torch.randn(clean.shape, generator=generator)
                latents, noise = clean.to(device, dtype), noise.to(device, dtype)
                inputs = objective.inputs_at(latents, torch.tensor([level]), noise)
                inputs = replace(inputs, condition=condition)
                # No denoiser given: the model's own, for Wan 2.2 A14B the expert its pipeline uses at this level.
                losses.append(denoising_loss(family.predict(pipe, inputs, text), inputs).item())
                clip_ids.append(clip_id)
                levels.append(level)
    return HeldoutLosses(clip_ids, levels, losses)
