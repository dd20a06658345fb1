"""The one small protocol every model family implements (STYLE.md 3), and the records it passes around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TextEmbeddings:
    embeds: torch.Tensor  # (batch, tokens, dim)
    mask: torch.Tensor | None = None  # (batch, tokens), 1 = real token
    pooled: torch.Tensor | None = None  # (batch, dim): SDXL's second text encoder's projection


@dataclass
class TrainingInputs:
    """What one denoiser forward pass needs, and what it is scored against."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor  # per-sample loss weight, broadcastable to target


class ModelFamily(Protocol):
    name: str
    pipeline_class_name: str  # the diffusers pipeline class in model_index.json
    denoiser_name: str  # the pipeline attribute that trains: "transformer" or "unet"
    default_lora_targets: tuple[str, ...]
    full_subsets: dict[str, str]  # named parameter-name patterns for partial full fine-tuning

    text_encoders: tuple[str, ...]  # pipeline components that encode prompts (not loaded to train from a cache)

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        """`from_pretrained` of the family's pipeline; `components` replace parts (None: not loaded)."""

    def valid_num_frames(self, frames: int) -> bool: ...

    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings: ...

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        """(batch, 3, frames, h, w) in [-1, 1] -> VAE posterior moments (mean and logvar stacked on dim 1)."""

    def sample_latents(self, pipe, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    objective_kind: str  # "flow" (rectified flow) or "vp" (DDPM-style): which ObjectiveParams apply

    def objective(self, pipe, params=None):
        """The training objective from the model's config and `ObjectiveParams`: `.inputs(latents, generator)`
        -> TrainingInputs."""

    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        """The denoiser's output for `inputs`; `denoiser` overrides the pipeline's own (e.g. its DDP wrapper)."""
