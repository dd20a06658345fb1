"""What the trainer takes: one pydantic model, declared once (CONTRIBUTING.md, Style 1). `vidtune.flows.finetune.FinetuneParams`
extends it with the data and model, so these names are also the `--set` keys and the Prefect UI form."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS
from vidtune.training.devices import bf16_supported
from vidtune.training.families.objectives import ObjectiveParams

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class SamplingParams(BaseModel):
    """How samples are rendered: shared by validation during training and by evaluation afterwards."""

    model_config = ConfigDict(extra="forbid")

    num_frames: int | None = Field(None, ge=1, description="Frames per sample; default: the shortest training bucket.")
    height: int | None = Field(None, ge=8, description="Sample height; default: the training clips' height.")
    width: int | None = Field(None, ge=8, description="Sample width; default: the training clips' width.")
    inference_steps: int = Field(INFERENCE_STEPS, ge=1, description="Denoising steps per sample.")
    guidance_scale: float = Field(GUIDANCE_SCALE, ge=1.0, description="Classifier-free guidance scale (1 = off).")
    seed: int = Field(42, description="Sample seed: the same noise every time, so samples compare.")


class ValidationParams(SamplingParams):
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts rendered every `every` steps ({trigger}: the dataset's trigger word; none: no samples).",
    )
    every: int = Field(250, ge=1, description="Render validation samples every N optimizer steps (and at the end).")
    images: list[str] = Field(
        default_factory=list,
        description="Image-to-video families: image files the samples start from (first frames), one per prompt in "
        "turn, cycling; evaluation uses them too. Default: the held-out clips' first frames.",
    )
    fps: int = Field(FPS, ge=1, description="Frame rate of the written MP4/GIF.")
    heldout_draws: int = Field(
        16,
        ge=1,
        description="Noise levels per held-out clip (a stratified grid over the whole range, fixed noise) of the "
        "held-out loss measured at every checkpoint.",
    )

    @field_validator("images")
    @classmethod
    def _absolute(cls, images: list[str]) -> list[str]:
        """Absolute from where they were given: the run's train_job.json is read by evaluation from any folder."""
        return [str(Path(image).expanduser().resolve()) for image in images]


# DataLoader workers when `data_workers` is not set and a GPU trains (one reads while another's batch waits).
DATA_WORKERS_ON_GPU = 2


class TrainParams(ObjectiveParams):
    """One trainer for LoRA and full fine-tuning: `training_type` picks what trains, nothing else changes. The
    objective's settings (timestep sampling, flow shift, loss weighting) are inherited: one flat set of names."""

    model_config = ConfigDict(extra="forbid")

    training_type: Literal["lora", "full"] = Field(
        "lora", description="lora: train a low-rank adapter; full: train the denoiser's weights."
    )
    rank: int = Field(32, gt=0, le=1024, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale = alpha / rank); default: the rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_targets: list[str] | str | None = Field(
        None,
        description="Module names to adapt (list) or one regex that must match a whole module path; default: the family's attention projections.",
    )
    experts: Literal["high", "low", "both"] | None = Field(
        None,
        description="Two-expert models (Wan 2.2 A14B): high trains the high-noise expert (transformer, timesteps at or "
        "above boundary_ratio x 1000), low the low-noise one (transformer_2), both a LoRA for each (each step trains "
        "the expert its drawn timestep belongs to); default: both. Refused for a model with one denoiser.",
    )
    full_modules: str | None = Field(
        None,
        description="Full fine-tuning of a subset: a family subset name (e.g. temporal) or a regex over parameter names; default: all.",
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal[LR_SCHEDULES] = Field("constant_with_warmup", description="diffusers learning-rate schedule.")  # type: ignore[valid-type]
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field(
        "adamw",
        description="adamw (torch), or adamw8bit (bitsandbytes, GPU; less optimizer memory). auto: adamw, the name "
        "older configs used. The optimizer used is logged to MLflow as optimizer_used.",
    )
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")
    ema_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Keep an EMA of the trained weights with this decay and export it (null: off).",
    )
    seed: int = Field(0, description="Seed for weights, noise, timesteps and data order.")
    batch_size: int = Field(1, ge=1, description="Clips per batch per process (a batch never mixes buckets).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    max_steps: int = Field(1000, gt=0, description="Optimizer steps to train.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute denoiser activations in backward: less memory, more time."
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else no (fp32)."
    )
    fp8: Literal["none", "cast", "scaled"] = Field(
        "none",
        description="Store frozen denoiser weights in float8 (LoRA only): scaled (E4M3 with a scale per 64 weights, "
        "dequantised per layer; about half cast's error) or cast (diffusers layerwise casting, unscaled).",
    )
    fp8_storage: bool = Field(False, description="Older configs' name for fp8=cast.")
    attention_backend: Literal["native", "flash", "_flash_3", "flex", "xformers"] = Field(
        "native",
        description="diffusers' attention backend for the denoiser: native (torch SDPA), flash (flash-attn 2), "
        "_flash_3 (FlashAttention 3), flex (torch flex attention), xformers. Not sage: it has no backward pass.",
    )

    @field_validator("attention_backend", mode="before")
    @classmethod
    def _trainable_backend(cls, value):
        if isinstance(value, str) and value.startswith("sage"):
            raise ValueError(
                f"{value} cannot train: SageAttention has no backward pass (diffusers raises NotImplementedError in "
                "it), so the attention's LoRA would get no gradients; use flash, _flash_3, flex or native"
            )
        return value

    compile: Literal["none", "blocks"] = Field(
        "none",
        description="blocks: torch.compile each transformer block (the first steps are slower while it compiles).",
    )
    offload: Literal["none", "blocks"] = Field(
        "none",
        description="blocks: keep the frozen weights of `blocks_to_swap` transformer blocks in host memory and bring "
        "each to the GPU only while it computes, forward and backward (a 14B Wan on a 24 GB card).",
    )
    blocks_to_swap: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="With offload=blocks: how many of the denoiser's blocks swap (the first N; more: less memory, "
        "slower), or auto: the fewest that make the memory plan's estimate fit the GPU (resolved when finetune "
        "starts; refused without a GPU).",
    )
    checkpoint_every: int = Field(
        500,
        ge=1,
        description="Save a resumable checkpoint every N optimizer steps, and measure the fixed held-out loss there.",
    )
    select_checkpoint: Literal["best", "last"] = Field(
        "best",
        description="Which weights evaluation, registration and the ComfyUI export get: best (the checkpoint with "
        "the lowest fixed held-out loss) or last (the final step).",
    )
    keep_checkpoints: int = Field(3, ge=1, description="Keep the newest K checkpoints.")
    resume: str | None = Field(
        None, description="latest (newest checkpoint of this run's output), a checkpoint folder, or null."
    )
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Probability that a clip trains with the empty prompt, so the model keeps the unconditional "
        "prediction classifier-free guidance uses (0.1 is common for style LoRAs).",
    )
    repeats: dict[str, int] = Field(
        default_factory=dict,
        description="Per-source weights: {glob: N} trains the clips of sources whose path or file name matches the "
        "glob N times per epoch (e.g. {'hero/*': 3}); unmatched sources once.",
    )
    image_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Share of each epoch's samples that are stills (curated images), reached with whole repeats of "
        "the images or of the videos; 0 leaves images out; null: as curated.",
    )
    data_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes (0: read in the training process). Default: 2 on a GPU (with pinned "
        "memory, so the next batch is read while a step computes), 0 on a CPU.",
    )
    validation: ValidationParams = Field(default_factory=ValidationParams)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, values):
        """Settings of earlier versions that no longer mean anything, dropped so their train_job.json files still
        read: shuffle_buffer (the sampler permutes every epoch globally; vidtune.training.sampler)."""
        if isinstance(values, dict) and "shuffle_buffer" in values:
            values = {k: v for k, v in values.items() if k != "shuffle_buffer"}
        return values

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainParams:
        bad = {glob: n for glob, n in self.repeats.items() if n < 1}
        if bad:
            raise ValueError(
                f"repeats: each count must be at least 1 (0 would drop the clips; filter them instead): {bad}"
            )
        on_this_machine = not (info.context or {}).get("remote")  # `vidtune run` validates for a worker elsewhere
        if self.mixed_precision == "fp16" and on_this_machine and not torch.cuda.is_available():
            raise ValueError("mixed_precision: fp16 needs a GPU (CPU autocast has no fp16); use bf16 or no")
        if self.fp8_storage and self.fp8 == "none":
            self.fp8 = "cast"
        if self.fp8 != "none" and self.training_type != "lora":
            raise ValueError("fp8: only with training_type=lora (fully trained weights stay in full precision)")
        if self.offload == "blocks" and self.blocks_to_swap != "auto" and self.blocks_to_swap < 1:
            raise ValueError("blocks_to_swap: offload=blocks needs at least 1 block to swap")
        if self.offload == "none" and self.blocks_to_swap == "auto":
            raise ValueError("blocks_to_swap: auto sizes the swap of offload=blocks; set offload=blocks, or leave it 0")
        if self.offload == "none" and self.blocks_to_swap:
            raise ValueError(f"blocks_to_swap: {self.blocks_to_swap} blocks swap only with offload=blocks")
        if on_this_machine and self.attention_backend != "native":
            problem = attention_backend_problem(self.attention_backend)
            if problem:
                raise ValueError(f"attention_backend: {problem}")
        if self.compile == "blocks" and self.offload == "blocks":
            raise ValueError("compile: blocks is not combined with offload=blocks yet (the swap's hooks break graphs)")
        if self.offload == "blocks" and self.fp8 == "scaled" and not self.gradient_checkpointing:
            raise ValueError(
                "offload: blocks with fp8=scaled needs gradient_checkpointing=true (without it autograd keeps every "
                "block's dequantised weights for the backward, and swapping saves nothing)"
            )
        if self.offload == "blocks" and self.fp8 == "cast":
            raise ValueError(
                "offload: blocks swaps fp8=scaled weights, not fp8=cast's (layerwise casting); use fp8=scaled"
            )
        if self.training_type == "lora" and self.full_modules is not None:
            raise ValueError("full_modules: only with training_type=full (LoRA picks modules with lora_targets)")
        if self.training_type == "full" and self.lora_targets is not None:
            raise ValueError("lora_targets: only with training_type=lora")
        return self

    def resolved_data_workers(self) -> int:
        if self.data_workers is not None:
            return self.data_workers
        return DATA_WORKERS_ON_GPU if torch.cuda.is_available() else 0

    def resolved_precision(self) -> str:
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if bf16_supported() else "no"


class RunTarget(BaseModel):
    """What a training run trains, where it writes and where it logs: declared once, for the `finetune` form (where
    `family` and `tracking_uri` may be left to defaults) and the resolved `TrainJob` (where the flow has set them)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Base model: a local diffusers folder or a hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
    )
    out: str = Field(description="Run folder: adapter/ (or model/), checkpoints/, samples/.")
    family: str | None = Field(
        None,
        description="Model family; default: detected from the model's model_index.json. Set ltx-video-i2v to train "
        "LTX-Video's image-to-video (first-frame) conditioning on an LTX-Video checkpoint.",
    )
    data_source: Literal["cache", "shards"] = Field(
        "cache", description="cache: train on precomputed latents; shards: encode clips every step."
    )
    experiment: str = Field("vidtune", description="MLflow experiment.")
    run_name: str | None = Field(None, description="MLflow run name; default: MLflow's.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///$VIDTUNE_HOME/mlflow.db."
    )
    export_comfyui: bool | None = Field(
        None,
        description="adapter/comfyui_lora.safetensors keyed for ComfyUI: by default for the families ComfyUI loads "
        "(wan, ltx-video, hunyuan-video); true: required (refused for others); false: not written.",
    )


def attention_backend_problem(name: str) -> str | None:
    """Why diffusers' attention backend `name` cannot run here (its package missing or too old), or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as exc:
        return f"{name} cannot run here: {exc}"
    return None
