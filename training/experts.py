"""Two-expert models (Wan 2.2 A14B): `transformer` denoises timesteps at or above `boundary_ratio * 1000` (high
noise), `transformer_2` the ones below (low noise), as diffusers' WanPipeline routes them. Which experts a run
trains (`experts`), the noise levels each takes, and the adapter file each one's LoRA is saved in.

diffusers fixes no file names for a two-expert LoRA: both files hold `transformer.*` keys (what
`load_lora_weights` expects); the second is loaded with `load_into_transformer_2=True`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ExpertChoice = Literal["high", "low", "both"]
HIGH, LOW = "transformer", "transformer_2"  # the pipeline attributes of the high- and low-noise experts
ADAPTER_FILES = {HIGH: "pytorch_lora_weights.safetensors", LOW: "pytorch_lora_weights_transformer_2.safetensors"}


@dataclass(frozen=True)
class Expert:
    """A denoiser of the pipeline and the noise levels (sigma = timestep / 1000) it is trained on: [low, high)."""

    module: str
    low: float = 0.0
    high: float = 1.0

    def covers(self, sigma: float) -> bool:
        return self.low <= sigma < self.high or sigma == self.high == 1.0


def boundary_ratio(config) -> float | None:
    """The pipeline's (or model_index.json's) expert boundary, when it has a second expert."""
    second = config.get(LOW)
    has_second = second is not None and not (isinstance(second, (list, tuple)) and second[0] is None)
    return config.get("boundary_ratio") if has_second else None


def check_experts(choice: ExpertChoice | None, config, model: str) -> None:
    """Refuse `experts` for a model with one denoiser (`config`: its model_index.json), naming the field."""
    if choice is not None and boundary_ratio(config) is None:
        raise ValueError(
            f"experts: {model} has one denoiser; experts (high, low, both) is for two-expert models such as "
            "Wan 2.2 A14B (transformer and transformer_2 with a boundary_ratio): leave experts unset"
        )


def model_experts(pipe, denoiser_name: str, choice: ExpertChoice | None) -> tuple[Expert, ...]:
    """The experts a run trains: the one denoiser over all noise levels, or for a two-expert model the high-noise
    expert above the boundary and/or the low-noise one below it (`choice`, default both)."""
    ratio = boundary_ratio(pipe.config)
    if ratio is None:
        check_experts(choice, pipe.config, "the model")
        return (Expert(denoiser_name),)
    high, low = Expert(HIGH, ratio, 1.0), Expert(LOW, 0.0, ratio)
    return {"high": (high,), "low": (low,), "both": (high, low), None: (high, low)}[choice]


def pick_expert(experts: tuple[Expert, ...], objective, seed: int, step: int) -> Expert:
    """The expert an optimizer step trains: the one whose range holds a level drawn as training draws them, so
    each expert trains in proportion to its share of the noise levels. The draw depends on (seed, step) only:
    every rank and every micro-batch of an accumulation picks the same expert, and a resumed run picks as before."""
    if len(experts) == 1:
        return experts[0]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    sigma = float(objective.sigmas(1, 1, generator)[0])  # Wan 2.2's flow shift is fixed: no token count needed
    return next(expert for expert in experts if expert.covers(sigma))


def idle_experts(pipe, experts: tuple[Expert, ...]) -> list[str]:
    """The second expert's attribute when a two-expert run trains only one (it serves validation samples only)."""
    if boundary_ratio(pipe.config) is None:
        return []
    return [module for module in (HIGH, LOW) if module not in {expert.module for expert in experts}]


def check_expert_timesteps(experts: tuple[Expert, ...], min_timestep: int, max_timestep: int) -> None:
    """Refuse, naming the fields, a timestep range that leaves an expert nothing to train on."""
    for expert in experts:
        if expert.high * 1000 <= min_timestep or expert.low * 1000 >= max_timestep:
            raise ValueError(
                f"min_timestep/max_timestep: {min_timestep}-{max_timestep} leaves the {expert.module} expert "
                f"(timesteps {expert.low * 1000:g}-{expert.high * 1000:g}) nothing to train on; widen them or set "
                "experts to the other expert"
            )
