"""The base class every model family derives from (its defaults are what most families share), and the records it
passes around."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vidtune.training.comfyui import ComfyUIKeys
from vidtune.training.published_configs import TinySpec


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
    loss_mask: torch.Tensor | None = None  # 1 where the target is learned, broadcastable to target; None: everywhere
    condition: dict[str, torch.Tensor] = field(default_factory=dict)  # the family's `encode_condition`, batched


class ModelFamily(ABC):
    """What the registry, the CLI, the latent cache, the trainer and the shared family test suite read of a model
    family. A new family is one subclass (the members below without a default, and overrides where the model
    differs) plus its line in `FAMILIES`."""

    name: ClassVar[str]  # the `model.family` value and the registry key
    title: ClassVar[str]  # what users call it, for help texts: "Wan 2.1", "LTX-Video"
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline class in model_index.json
    objective_kind: ClassVar[str]  # "flow" (rectified flow) or "vp" (DDPM-style): which ObjectiveParams apply
    full_subsets: ClassVar[dict[str, str]]  # named parameter-name patterns for partial full fine-tuning
    frame_buckets: ClassVar[tuple[int, ...]]  # clip lengths the latent cache makes by default, longest first
    tiny_models: ClassVar[dict[str, TinySpec]]  # tiny random variants of published checkpoints; the family's name first

    denoiser_name: ClassVar[str] = "transformer"  # the pipeline attribute that trains: "transformer" or "unet"
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # left out of training when prompts are cached
    temporal_compression: ClassVar[int] = 4  # the VAE keeps the first frame and compresses the rest this much
    comfyui_keys: ClassVar[ComfyUIKeys | None] = None  # diffusers -> ComfyUI module names; None: ComfyUI has no loader
    image_conditioned: ClassVar[bool] = False  # image-to-video: the pipeline takes `image=`, the video's first frame
    cache_revision: ClassVar[int] = 0  # raised when what the family caches changes: its latent caches are made anew
    # What `encode_video` gives and the latent cache keeps: the VAE posterior's moments (mean and log-variance), from
    # which each step draws a fresh sample, as the family's reference trainers do; or (False) the mean alone, which
    # the family's reference code trains on (half the bytes).
    caches_posterior: ClassVar[bool] = True
    # The denoiser's module lists of transformer blocks, in the order its forward runs them: what `offload: blocks`
    # swaps (empty: the family's denoiser is not a chain of blocks, and block swap is refused).
    block_lists: ClassVar[tuple[str, ...]] = ()
    # The pipeline's denoiser components (two for Wan 2.2 A14B), which precompute leaves unloaded unless the
    # family's encoding reads their config (then they are loaded but stay on the CPU).
    denoiser_components: ClassVar[tuple[str, ...]] = ("transformer",)
    precompute_reads_denoiser: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return  # an intermediate base
        missing = [
            m
            for m in (
                "name",
                "title",
                "pipeline_class_name",
                "objective_kind",
                "full_subsets",
                "frame_buckets",
                "tiny_models",
            )
            if not hasattr(cls, m)
        ]
        if missing:
            raise TypeError(f"model family {cls.__name__} does not set {', '.join(missing)}")
        invalid = [frames for frames in cls.frame_buckets if not cls.valid_num_frames(cls, frames)]
        if invalid:
            raise TypeError(f"model family {cls.name}: frame_buckets {invalid} are not frame counts its VAE takes")

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32, **components):
        """`from_pretrained` of the family's pipeline; `components` replace parts (None: not loaded)."""
        import diffusers

        from vidtune.training.progress_lines import quiet_library_bars

        quiet_library_bars()  # in a log file, no carriage-return bars of "Loading pipeline components"

        return getattr(diffusers, self.pipeline_class_name).from_pretrained(model, dtype=dtype, **components)

    def sampling_arguments(self, image=None) -> dict:
        """The pipeline call's conditioning arguments besides the prompt: `image` (a PIL image) for an
        image-to-video family, which needs one; refused for a text-to-video family."""
        if image is not None and not self.image_conditioned:
            raise ValueError(
                f"image: {self.title} ({self.name}) generates from text only; leave out the image, or use a model "
                f"trained with an image-to-video family ({', '.join(image_families())})"
            )
        if image is None and self.image_conditioned:
            raise ValueError(
                f"image: {self.title} ({self.name}) generates from a conditioning image, the video's first frame; "
                "pass one (vidtune generate --image PATH)"
            )
        return {} if image is None else {"image": image}

    def check_samples_possible(
        self,
        validation_prompts: list[str],
        validation_images: list[str],
        run_evaluation: bool = False,
        holdout_clips: int = 0,
    ) -> None:
        """Refuse, before any work, samples (validation, evaluation) that cannot render: `validation.images` that are
        not image files, or given to a text-to-video family; for an image-to-video one, samples with no image to start
        from (`validation.images`, else the held-out clips' first frames)."""
        from vidtune.training.media import read_image

        if validation_images and not self.image_conditioned:
            raise ValueError(
                f"validation.images: {self.title} ({self.name}) generates from text only; leave validation.images empty"
            )
        for path in validation_images:
            read_image(path, "validation.images")
        wanted = bool(validation_prompts) or run_evaluation
        if self.image_conditioned and wanted and not validation_images and not holdout_clips:
            raise ValueError(
                f"holdout_clips: {self.title} ({self.name}) renders validation samples and evaluation from "
                "conditioning images, the held-out clips' first frames or validation.images, and this run has "
                "neither; set holdout_clips to 1 or more or give validation.images (or leave validation.prompts "
                "empty and set run_evaluation=false)"
            )

    def valid_num_frames(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.temporal_compression == 0

    def check_clip_size(self, model: str, frames: int, height: int, width: int) -> None:
        """Refuse, naming the setting, clip sizes the model cannot take (before any work); default: all pass."""

    def check_model(self, model: str) -> None:
        """Refuse, before any work, a model this family cannot train (read from a local folder's configs); default:
        all pass."""

    def encode_condition(self, pipe, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the denoiser is conditioned on besides the text and the clip's own latents, from the clip's pixels
        (batch, 3, frames, h, w) in [-1, 1]: cached beside the latents, batched into `TrainingInputs.condition`.
        Default: nothing (an image-to-video family whose conditioning frame is in the clip's latents needs nothing
        either)."""
        return {}

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        """(batch, 3, frames, h, w) in [-1, 1] -> what the latent cache keeps: the VAE posterior's moments (mean and
        logvar stacked on dim 1), or its mean alone where `caches_posterior` is False."""
        with torch.no_grad():
            posterior = pipe.vae.encode(video.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        return posterior.parameters if self.caches_posterior else posterior.mode()

    @abstractmethod
    def encode_prompts(self, pipe, prompts: list[str]) -> TextEmbeddings: ...

    @abstractmethod
    def sample_latents(self, pipe, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's clean latents from `encode_video`'s output: a posterior sample of the moments (or the mean
        itself where `caches_posterior` is False), scaled and shifted as the denoiser expects."""

    @abstractmethod
    def objective(self, pipe, params=None):
        """The training objective from the model's config and `ObjectiveParams`: `.inputs(latents, generator)`
        -> TrainingInputs."""

    @abstractmethod
    def predict(self, pipe, inputs: TrainingInputs, text: TextEmbeddings, denoiser=None) -> torch.Tensor:
        """The denoiser's output for `inputs`; `denoiser` overrides the pipeline's own (e.g. its DDP wrapper)."""


def model_file(model: str | Path, name: str) -> Path | None:
    """A file of a diffusers model (`model_index.json`, `transformer/config.json`): in a local folder, or fetched
    from the hub for a hub id (that small file only; a cached copy when offline). None when there is no such file;
    a hub id that cannot be read is a ValueError saying to pass a local folder."""
    folder = Path(model).expanduser()
    if folder.is_dir() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(model), name))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # offline, unknown repo, gated: say which and what to do
        raise ValueError(
            f"model: cannot read {name} of hub id {model} ({type(exc).__name__}); pass a local folder"
        ) from exc


def image_families() -> list[str]:
    """The defined image-to-video families' names, for messages (every subclass of ModelFamily that sets one)."""
    found, pending = set(), list(ModelFamily.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if getattr(cls, "image_conditioned", False) and isinstance(getattr(cls, "name", None), str):
            found.add(cls.name)
    return sorted(found)
