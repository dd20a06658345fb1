"""The trainer: one loop for LoRA and full fine-tuning of any model family, under `accelerate` (device placement,
mixed precision, gradient accumulation, DDP across processes).

`train(job)` runs in-process for one process, and under `accelerate launch -m vidtune.training.launch JOB.json` for
several; both write RUN/checkpoints/, RUN/samples/, RUN/adapter/ (or RUN/model/ for full fine-tuning) and one
MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch

from vidtune.training.adapters import (
    comfyui_export,
    comfyui_file,
    export_comfyui,
    lora_modules_of,
    save_full_model,
    save_lora_adapter,
)
from vidtune.training.batches import encode_batch
from vidtune.training.cache import check_cached_prompts, load_prompt
from vidtune.training.checkpoints import (
    Checkpointer,
    TrainState,
    check_resumable,
    data_layout,
    find_latest,
    resolve_resume,
    saved_step,
)
from vidtune.training.data import caption_dropped, drop_captions, make_stream, read_clips
from vidtune.training.experts import (
    Expert,
    boundary_ratio,
    check_expert_timesteps,
    idle_experts,
    model_experts,
    pick_expert,
)
from vidtune.training.families import ModelFamily, get_family
from vidtune.training.families.base import TrainingInputs
from vidtune.training.families.objectives import check_objective_params, denoising_loss
from vidtune.training.files import write_json_atomic
from vidtune.training.fp8 import store_fp8
from vidtune.training.job import TrainJob
from vidtune.training.layout import RunLayout
from vidtune.training.offload import BlockSwap, compile_blocks, transformer_blocks
from vidtune.training.params import TrainParams
from vidtune.training.progress_lines import StepProgress
from vidtune.training.sampling import conditioning_images, render_samples
from vidtune.training.selection import BestCheckpoint
from vidtune.training.tracking import RunTracker, flatten
from vidtune.training.trainable import make_optimizer, make_trainable

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number; the last good checkpoint is kept."""


# Fewer out-of-memory errors from fragmentation with many bucket shapes; a user's own setting wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


class StepFailed(RuntimeError):
    """A training step raised (out of memory, a bad sample...): the message names the step, the rank(s) and the
    batch's bucket, the checkpoint to resume from, and for out of memory the settings that lower it. `together`:
    every rank raised it (and says the same); otherwise only this rank failed."""

    together = True


class FailedTogether(Exception):
    """A micro-batch failed on at least one rank (`ranks`), raised on every rank at the same point (the step's
    outcome gather, before its gradient all-reduce), so that all of them checkpoint the last completed step
    together. `error` is this rank's own exception, None on the ranks that were well."""

    def __init__(self, error: Exception | None, ranks: list[int]):
        super().__init__(f"micro-batch failed on rank(s) {ranks}")
        self.error, self.ranks = error, ranks


# Gradients are all-reduced by the trainer (see `Trainer.step`) in buckets of at most this many elements.
GRADIENT_BUCKET = 2**26


@dataclass
class TrainResult:
    out: Path
    weights: Path  # RUN/adapter (LoRA) or RUN/model (full)
    steps: int
    losses: list[float]
    mlflow_run_id: str | None
    samples_per_s: float
    peak_memory_mb: float
    checkpoints: list[Path] = field(default_factory=list)
    checkpoint: dict = field(default_factory=dict)  # which weights were exported and why (Selection.as_dict)
    heldout_curve: Path | None = None  # RUN/heldout_loss.png, when held-out clips were measured

    @classmethod
    def from_json(cls, path: Path) -> TrainResult:
        """Read what `vidtune.training.launch` wrote (paths come back as Paths)."""
        values = json.loads(Path(path).read_text())
        values.update(
            out=Path(values["out"]),
            weights=Path(values["weights"]),
            checkpoints=[Path(p) for p in values["checkpoints"]],
            heldout_curve=Path(values["heldout_curve"]) if values.get("heldout_curve") else None,
        )
        return cls(**values)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def batch_loss(
    family: ModelFamily,
    pipe,
    denoiser,
    batch: dict,
    dtype: torch.dtype,
    objective=None,
    expert: Expert | None = None,
    on_inputs: Callable[[TrainingInputs], None] | None = None,
) -> torch.Tensor:
    """Weighted denoising loss on one batch: cached latents (or video encoded now) -> noisy latents -> prediction.
    `objective`: the family's, built once per run (default: from the model's config with default settings);
    `expert`: a two-expert model's expert being trained (noise levels drawn in its range); `denoiser` None: the
    model's own (for two experts, the one its pipeline uses at each timestep); `on_inputs`: told the drawn inputs."""
    device = getattr(pipe, expert.module if expert else family.denoiser_name).device  # the VAE may wait on the CPU
    encoded, text, condition = encode_batch(family, pipe, batch, dtype, device)
    objective = objective or family.objective(pipe)
    latents = family.sample_latents(pipe, encoded)
    ranged = expert is not None and (expert.low, expert.high) != (0.0, 1.0)
    inputs = objective.inputs(latents, within=(expert.low, expert.high)) if ranged else objective.inputs(latents)
    inputs = replace(inputs, condition=condition)
    if on_inputs is not None:
        on_inputs(inputs)
    return denoising_loss(family.predict(pipe, inputs, text, denoiser=denoiser), inputs)


class Trainer:
    """One training run, in the order it happens: `setup` (accelerator, model, optimizer, checkpoint, tracker,
    data), then per micro-batch `step` and, at each optimizer-step boundary, `after_step` (log, checkpoint,
    validate), then `finish` (what each rank saw, the weights, the MLflow run). `run` is the loop around them."""

    def __init__(self, job: TrainJob, on_step: Callable[[int, float], None] | None = None):
        self.job, self.on_step = job, on_step
        self.params, self.family = job.params, get_family(job.family)
        self.layout = RunLayout(Path(job.out))

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

        job, params, family, layout = self.job, self.params, self.family, self.layout
        check_objective_params(family.objective_kind, params, family.name)
        validation = params.validation
        family.check_samples_possible(validation.prompts, validation.images, holdout_clips=len(job.holdout_clip_ids))
        if params.resume is None and find_latest(layout.checkpoints):
            raise ValueError(
                f"out: {layout.root} holds checkpoints of an earlier run; continue it with resume=latest, or choose a new out folder"
            )
        precision = params.resolved_precision()
        # accelerate keeps one state per process; a second run in the same process (a Prefect worker, a notebook)
        # with other precision or accumulation settings must start from a clean one. The process group stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        # Other ranks wait while rank 0 renders validation samples: allow that longer than NCCL's 10-minute default.
        self.accelerator = accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=params.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),  # so a torchrun-launched CPU job forms a gloo group
            kwargs_handlers=[
                InitProcessGroupKwargs(timeout=timedelta(hours=2)),
                # The models' buffers are constants (RoPE tables): no broadcast, so a DDP forward has no collective
                # and a rank whose batch failed before its forward meets the others at the step's outcome gather.
                DistributedDataParallelKwargs(broadcast_buffers=False),
            ],
        )
        set_seed(params.seed)
        self.dtype = WEIGHT_DTYPES[precision]

        self.pipe, self.denoisers, self.trainable, self.swaps = _prepare_model(
            job, family, accelerator.device, self.dtype
        )
        if self.swaps and accelerator.num_processes > 1:  # swapped weights are empty while evicted: not DDP's to sync
            for module, swap in self.swaps.items():
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.denoisers[module], swap.frozen_names(self.denoisers[module])
                )
        self.experts = model_experts(self.pipe, family.denoiser_name, params.experts)
        check_expert_timesteps(self.experts, params.min_timestep, params.max_timestep)
        self.prompt_cache = Path(job.prompt_cache) if pipe_without_text_encoders(job) else None
        if self.prompt_cache is not None:
            check_cached_prompts(self.prompt_cache, params.validation.prompts)
        self.empty_prompt = None  # what a dropped caption is replaced by, for cached clips
        if params.caption_dropout and job.data_source == "cache":
            self.empty_prompt = (
                load_prompt(self.prompt_cache, "") if self.prompt_cache else family.encode_prompts(self.pipe, [""])
            )
        images = conditioning_images(
            family, len(validation.prompts), validation.images, job.curated_shards(), job.holdout_clip_ids
        )  # image-to-video: what each validation sample starts from
        self.sample_conditioning = None if images is None else [family.sampling_arguments(i) for i in images]
        self.objective = family.objective(
            self.pipe, params
        )  # from the model's config, before sampling touches the scheduler
        optimizer, scheduler, self.ema = _optimization(params, list(self.trainable.values()), accelerator)
        *wrapped, self.optimizer, self.scheduler = accelerator.prepare(*self.denoisers.values(), optimizer, scheduler)
        self.wrapped = dict(zip(self.denoisers, wrapped))
        # Several DDP processes: gradients are all-reduced by `step` (see there); FSDP/DeepSpeed keep their own.
        self.own_gradient_sync = accelerator.num_processes > 1 and all(
            isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in wrapped
        )
        # Every rank started from one seed, so the weights it made agree; from here each rank draws its own noise
        # levels and noise (seed + rank; a resume restores each rank's own RNG state from the checkpoint).
        set_seed(params.seed, device_specific=True)

        self.checkpointer = Checkpointer(
            layout.checkpoints, accelerator, self.trainable, self.ema, params.keep_checkpoints
        )
        self.resume_from = resolve_resume(params.resume, layout.checkpoints)
        self.state = state = self.checkpointer.load(self.resume_from) if self.resume_from else TrainState()
        layout_now = data_layout(accelerator.num_processes, params)
        if self.resume_from:
            check_resumable(state.data_layout, layout_now, self.resume_from)
        state.data_layout = layout_now
        if self.resume_from and accelerator.is_main_process:
            print(f"resumed from {self.resume_from} at step {state.step}")

        self.best = BestCheckpoint(layout.best, resumed_at=state.step if self.resume_from else 0)
        self.tracker = RunTracker(
            job.tracking_uri, job.experiment, job.run_name, state.mlflow_run_id, active=accelerator.is_main_process
        )
        state.mlflow_run_id = self.tracker.run_id
        if not self.resume_from:
            self.tracker.log_params(
                {
                    **flatten(params.model_dump()),
                    "model": job.model,
                    "family": family.name,
                    "data_source": job.data_source,
                    "num_processes": accelerator.num_processes,
                    "trainable_parameters": sum(p.numel() for p in self.trainable.values()),
                    "optimizer_used": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                    **job.tags,
                }
            )
            if "data" in job.tags:
                self.tracker.log_dataset(Path(job.tags["data"]))

        stream = make_stream(
            job.data_source,
            job.shards,
            job.frame_buckets,
            batch_size=params.batch_size,
            seed=params.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            skip_batches=state.batches,
            exclude=frozenset(job.holdout_clip_ids),
            clip_ids=None if job.train_clip_ids is None else set(job.train_clip_ids),
            repeats=job.clip_repeats,
        )
        # Its own generator: creating an iterator would otherwise draw from the global RNG a resume has just restored.
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=params.resolved_data_workers(),
            pin_memory=accelerator.device.type == "cuda",  # batches copied to the GPU asynchronously
            generator=torch.Generator().manual_seed(params.seed),
        )
        self.per_step = params.batch_size * params.gradient_accumulation_steps * accelerator.num_processes
        self.micro_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses (on the device)
        self.step_rng: dict | None = None  # the generators at the start of the step in progress (None between steps)
        self.nan = torch.full((), math.nan, device=accelerator.device)  # a failed rank's loss (made before any failure)
        self.bucket: str | None = None  # of the batch in progress, named when a step fails
        self.heldout_batches: list[dict] | None = None  # the held-out clips, read at the first measurement
        # This process's record for RUN/trained_clips/ (what each rank saw), from the resume point on: a resumed
        # run starts from the record up to its checkpoint; it is written at every checkpoint and when a run stops.
        self.trained_clips, self.trained_buckets, self.trained_timesteps = self._trained_before(state.batches)
        self.started, self.started_step, self.rate = time.perf_counter(), state.step, 0.0

    def _trained_before(self, batches: int) -> tuple[list[str], list[str | None], list[list[float]]]:
        """This rank's record of the first `batches` micro-batches (a resume's; empty for a new run): a record
        written past the checkpoint resumed from (an interrupt, a failure) is cut back to it."""
        clips_file = self.layout.trained_clips(self.accelerator.process_index)
        if not self.resume_from or not clips_file.is_file():
            return [], [], []
        before = json.loads(clips_file.read_text())
        return _cut(before.get("clip_ids", []), before.get("buckets", []), before.get("timesteps", []), batches)

    def _cut_record(self, batches: int) -> None:
        self.trained_timesteps = [
            levels if isinstance(levels, list) else [round(float(t), 4) for t in levels.cpu()]
            for levels in self.trained_timesteps
        ]  # the levels still on the device, read now (a checkpoint, a stop: not every micro-batch)
        self.trained_clips, self.trained_buckets, self.trained_timesteps = _cut(
            self.trained_clips, self.trained_buckets, self.trained_timesteps, batches
        )

    def write_trained_clips(self) -> None:
        """RUN/trained_clips/rank-NN.json: the clips, buckets and noise levels this rank trained, in order."""
        self._cut_record(len(self.trained_buckets))  # a micro-batch that drew its levels and then failed
        record = {"clip_ids": self.trained_clips, "buckets": self.trained_buckets, "timesteps": self.trained_timesteps}
        write_json_atomic(
            self.layout.trained_clips(self.accelerator.process_index),
            {**record, "micro_batches": self.state.batches, "last_resumed_at_step": self.started_step},
        )

    def run(self) -> TrainResult:
        self.setup()
        params, state = self.params, self.state
        self.bar = StepProgress(
            total=params.max_steps,
            initial=state.step,
            desc="training",
            unit="step",
            disable=not self.accelerator.is_main_process,
        )
        batches = iter(self.loader)
        try:
            while state.step < params.max_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - an unreadable sample: `step` fails it on every rank at once
                    batch = exc
                self.bucket = None if isinstance(batch, Exception) else batch.get("bucket")
                if self.step(batch):
                    self.after_step()
        except KeyboardInterrupt:
            self.bar.close()
            self._interrupted()
            raise
        except TrainingDiverged:
            self.bar.close()
            self.tracker.finish("FAILED")
            raise
        except Exception as exc:  # out of memory, a bad sample, a lost device: keep the steps done, say what to try
            self.bar.close()
            self.tracker.finish("FAILED")
            if isinstance(exc, FailedTogether):
                exc.with_traceback(None)  # its frames hold the step's loss and batch; the cause keeps its own
            failed = StepFailed(self._failed(exc))
            failed.together = isinstance(exc, FailedTogether) or self.accelerator.num_processes == 1
            raise failed from exc
        except BaseException:
            self.bar.close()
            self.tracker.finish("FAILED")
            raise
        self.bar.close()
        return self.finish()

    def step(self, batch: dict | Exception) -> bool:
        """One micro-batch forward and backward; True when it completed an optimizer step.

        A failure (out of memory, a bad sample, the loader's exception passed in as `batch`) must stop every rank at
        the same micro-batch, so that all can checkpoint the last completed step. A rank whose forward failed skips
        its backward; then every rank's outcome (loss, failed, gradient size) is gathered once (`_outcome`), and with
        several DDP processes the gradients are all-reduced only after that (`average_gradients`, instead of DDP's
        all-reduce inside the backward, where a rank that failed would leave the others waiting). One process
        gathers nothing and syncs with the device once per optimizer step (the loss check before it is applied)."""
        accelerator, state = self.accelerator, self.state
        if not self.micro_losses:  # a step begins: what a failure's checkpoint restores, so a resume redraws it
            self.step_rng = _rng_states()
        # One expert per optimizer step (from seed and step): every micro-batch and rank trains the same one.
        expert = pick_expert(self.experts, self.objective, self.params.seed, state.step)
        with accelerator.accumulate(*self.wrapped.values()), self._local_gradients():
            loss, failure = None, None
            try:
                if isinstance(batch, Exception):
                    raise batch
                batch = self._drop_captions(batch)
                with accelerator.autocast():
                    loss = batch_loss(
                        self.family,
                        self.pipe,
                        self.wrapped[expert.module],
                        batch,
                        self.dtype,
                        self.objective,
                        expert,
                        self._record_levels,
                    )
                accelerator.backward(loss)
            except Exception as exc:  # noqa: BLE001 - every rank learns of it below, then all raise together
                failure = _without_frames(exc)
            loss = self.nan if loss is None else loss.detach()
            if accelerator.num_processes > 1:
                grads = self._gradients()
                outcome = self._outcome(loss, float(sum(g.numel() for g in grads)), failure)
                losses, sizes = outcome[:, 0], outcome[:, 1]
                if (sizes != sizes[0]).any():  # the all-reduce below would pair unequal buffers: a hang
                    raise FailedTogether(
                        RuntimeError(f"the ranks hold gradients of different sizes {sizes.tolist()}"),
                        list(range(accelerator.num_processes)),
                    )
                self._check_finite(losses)
                if self.own_gradient_sync and accelerator.sync_gradients:
                    average_gradients(grads, accelerator.num_processes)
            else:
                if failure is not None:
                    raise FailedTogether(failure, [0]) from failure
                losses = loss.reshape(1)
                if accelerator.sync_gradients:  # before the step is applied; the only device sync of the step
                    self._check_finite(torch.stack([*self.micro_losses, loss.float().mean()]))
            self.grad_norm = _apply(
                accelerator,
                list(self.trainable.values()),
                self.optimizer,
                self.scheduler,
                self.params.max_grad_norm,
            )
        state.batches += 1
        self.trained_clips += batch["clip_ids"]
        self.trained_buckets.append(batch.get("bucket"))
        self.micro_losses.append(losses.float().mean())  # a device tensor: read once per step, in after_step
        return accelerator.sync_gradients

    def _check_finite(self, losses: torch.Tensor) -> None:
        if not torch.isfinite(losses).all():
            raise TrainingDiverged(
                f"loss is {losses.tolist()} at step {self.state.step + 1}; training stopped before applying it. "
                f"Last good checkpoint: {self.checkpointer.latest() or 'none yet'}. Lower learning_rate or check the data."
            )

    def _drop_captions(self, batch: dict) -> dict:
        if not self.params.caption_dropout:
            return batch
        seed, dropout = self.params.seed, self.params.caption_dropout
        dropped = [caption_dropped(seed, self.state.batches, c, dropout) for c in batch["clip_ids"]]
        return drop_captions(batch, dropped, self.empty_prompt)

    def _outcome(self, loss: torch.Tensor, size: float, failure: Exception | None) -> torch.Tensor:
        """Every rank's (loss, gradient size), gathered with whether that rank failed; if any did, every rank raises
        `FailedTogether` here. Under FSDP or DeepSpeed the other ranks may be inside the framework's own collectives
        (weights gathered in the forward, gradients reduced in the backward): a failing rank stops alone."""
        if failure is not None and not self.own_gradient_sync:
            raise failure
        device = self.accelerator.device
        mine = torch.stack(
            [
                loss.to(torch.float64).mean().reshape(()),
                torch.tensor(size, dtype=torch.float64, device=device),
                torch.tensor(float(failure is not None), dtype=torch.float64, device=device),
            ]
        )
        everyone = self.accelerator.gather(mine.reshape(1, 3))
        failed = torch.nonzero(everyone[:, 2] > 0).flatten().tolist()
        if failed:
            raise FailedTogether(failure, failed) from failure
        return everyone[:, :2]

    @contextmanager
    def _local_gradients(self) -> Iterator[None]:
        """With several DDP processes, every micro-batch runs under DDP's `no_sync` (see `step`)."""
        with ExitStack() as stack:
            if self.own_gradient_sync:
                for model in self.wrapped.values():
                    stack.enter_context(self.accelerator.no_sync(model))
            yield

    def _gradients(self) -> list[torch.Tensor]:
        """The trained parameters' gradients, in one order on every rank (one expert's, when one trains a step)."""
        return [p.grad for p in self.trainable.values() if p.grad is not None]

    def _record_levels(self, inputs: TrainingInputs) -> None:
        """The noise level each clip of the batch trains at (per-token timesteps: the last frame's), for
        RUN/trained_clips/: how users and tests see that every rank draws its own."""
        timesteps = inputs.timesteps.detach().float()
        self.trained_timesteps.append(timesteps if timesteps.ndim == 1 else timesteps[:, -1])  # read when written

    def after_step(self) -> None:
        """At an optimizer-step boundary: count it, update the EMA, log, checkpoint and validate when due."""
        params, state = self.params, self.state
        state.step += 1
        state.samples += self.per_step
        self.step_rng = None  # the step is done: a failure from here on has nothing of it to give back
        state.losses.append(torch.stack(self.micro_losses).mean().item())
        if self.ema is not None:
            self.ema.step(list(self.trainable.values()))
        self.micro_losses = []  # empty again: the state is at a step boundary (what an interrupt may checkpoint)
        self.rate = (state.step - self.started_step) * self.per_step / (time.perf_counter() - self.started)
        metrics = {
            "loss": state.losses[-1],
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "samples_per_s": self.rate,
            "peak_memory_mb": peak_memory_mb(self.accelerator.device),
        }
        self.tracker.log_metrics(metrics, state.step)
        self.bar.set_postfix(loss=f"{state.losses[-1]:.4f}", lr=f"{metrics['lr']:.2e}")
        self.bar.update(1)
        if self.on_step is not None:
            self.on_step(state.step, state.losses[-1])
        if state.step % params.checkpoint_every == 0 or state.step == params.max_steps:
            self._check_ranks_agree()
            # Saved before measuring: RUN/best/ never holds a step later than the checkpoint a resume starts from.
            self.checkpointer.save(state)
            self.write_trained_clips()
            self.measure_heldout(state.step)
        if state.step % params.validation.every == 0 or state.step == params.max_steps:
            self.validate(state.step)

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same trained weights (only rank 0's are saved): a fingerprint of them is
        compared across ranks before each checkpoint. Every rank sees the same gather, so all raise together."""
        if not self.own_gradient_sync:  # one process; FSDP's ranks hold shards of their own
            return
        with torch.no_grad():
            fingerprint = sum(
                p.detach().double().sum() + p.detach().double().abs().sum() for p in self.trainable.values()
            )
        everyone = self.accelerator.gather(fingerprint.reshape(1))
        if not (everyone == everyone[0]).all():
            raise TrainingDiverged(
                f"the ranks' trained weights differ at step {self.state.step} (fingerprints {everyone.tolist()}): their "
                "gradients were not averaged alike. Nothing was saved for this step; please report it with the run's log."
            )

    def measure_heldout(self, step: int) -> None:
        """The fixed held-out loss of the weights that would be exported now (the EMA when kept), logged by step;
        the lowest so far is kept in RUN/best/. Each rank measures its share of the held-out clips (read once, at
        the first measurement) and the main process gathers the draws."""
        if not self.job.holdout_clip_ids:
            return
        from accelerate.utils import gather_object

        from vidtune.training.heldout import HeldoutLosses, heldout_losses

        job, accelerator, trainable = self.job, self.accelerator, list(self.trainable.values())
        if self.heldout_batches is None:  # the same clips at every checkpoint
            mine = sorted(job.holdout_clip_ids)[accelerator.process_index :: accelerator.num_processes]
            self.heldout_batches = list(read_clips(job.data_source, job.shards, job.frame_buckets, set(mine)))
        idle = [getattr(self.pipe, name) for name in idle_experts(self.pipe, self.experts)]  # every level is measured
        with (
            _exported_weights(self.ema, trainable),
            _evaluating(list(self.denoisers.values())),
            accelerator.autocast(),
            on_device(idle, accelerator.device),
        ):
            draws = self.params.validation.heldout_draws
            measured = heldout_losses(self.family, self.pipe, self.heldout_batches, draws=draws).as_dict()
            if accelerator.num_processes > 1:
                shares = gather_object([measured])
                measured = {key: [v for share in shares for v in share[key]] for key in measured}
            if not accelerator.is_main_process:
                return
            losses = HeldoutLosses(**measured)
            bands = losses.band_means()
            self.best.record(
                step, losses.mean(), bands, self.trainable, len(losses.losses)
            )  # the exported (EMA) weights, when best
        self.tracker.log_metrics(
            {"heldout_loss": losses.mean(), **{f"heldout_loss_{b}": v for b, v in bands.items()}}, step
        )

    def validate(self, step: int) -> None:
        if self.params.validation.prompts and self.accelerator.is_main_process:
            folder = self.layout.step_samples(step)
            waiting = [self.pipe.vae, *(getattr(self.pipe, name) for name in idle_experts(self.pipe, self.experts))]
            waiting += [encoder] if (encoder := getattr(self.pipe, "image_encoder", None)) is not None else []
            with self.accelerator.autocast(), on_device(waiting, self.accelerator.device):
                render_samples(
                    self.pipe,
                    list(self.denoisers.values()),
                    self.params.validation,
                    self.job.sample_size,
                    folder,
                    self.prompt_cache,
                    self.sample_conditioning,
                )
            self.tracker.log_artifacts(folder, f"samples/{folder.name}")

    def _failed(self, exc: Exception) -> str:
        """Checkpoint the last completed step and say what failed, where, what lowers memory, and the checkpoint to
        resume from. The micro-batches of the step that failed are given back to the data position, to accelerate's
        accumulation count and to the RNG, so a resume trains that step as it would have been. With several
        processes this needs every rank here together (a `FailedTogether`); a failure elsewhere (validation, a
        checkpoint write) ends this rank alone, and the launcher stops the others."""
        from accelerate.utils import gather_object

        state, accelerator = self.state, self.accelerator
        together = isinstance(exc, FailedTogether)
        error = exc.error if together else exc
        if together and accelerator.num_processes > 1:
            # Every rank's own account: the message names each failing rank, its bucket and its error.
            accounts = gather_object([(accelerator.process_index, self.bucket, _describe(error) if error else None)])
            failing = [(rank, bucket, said) for rank, bucket, said in accounts if said is not None]
            ranks = ", ".join(str(rank) for rank, _, _ in failing)
            where = f"on rank{'s' if len(failing) > 1 else ''} {ranks} "
            error_text = "; ".join(f"rank {rank}: bucket {bucket}, {said}" for rank, bucket, said in failing)
        else:
            where = f"on rank {accelerator.process_index} alone " if accelerator.num_processes > 1 else ""
            error_text = f"bucket {self.bucket}, {_describe(error)}"
        saved, unsaved = self.checkpointer.latest(), ""
        if (together or accelerator.num_processes == 1) and state.step > self.checkpointer.saved_at:
            self.optimizer.zero_grad(set_to_none=True)
            state.batches -= len(self.micro_losses)
            self.micro_losses = []
            self._cut_record(state.batches)
            # accelerate counts every micro-batch begun (the failed one too) and syncs gradients when the count is a
            # multiple of the accumulation; the checkpoint must hold the count at the step boundary.
            accelerator.step = state.batches
            if self.step_rng is not None:
                _restore_rng(self.step_rng)
            try:
                saved = self.checkpointer.save(state)
            except Exception as failure:  # noqa: BLE001 - the step's own failure is what the message must say
                unsaved = f" (saving step {state.step} failed too: {type(failure).__name__}: {str(failure)[:200]})"
        try:
            self.write_trained_clips()
        except OSError:
            pass
        out_of_memory = (error is not None and _out_of_memory(error)) or _says_out_of_memory(error_text)
        params = self.params
        advice = (
            "to lower memory: gradient_checkpointing=true"
            + ("" if params.gradient_checkpointing else " (now false)")
            + f", batch_size=1 (now {params.batch_size}) with gradient_accumulation_steps for the same step, "
            "mixed_precision=bf16, fp8=scaled, offload=blocks with blocks_to_swap, optimizer=adamw8bit, or smaller frame_buckets / sizes"
        )
        return (
            f"step {state.step + 1} failed {where}({error_text}){'; ' + advice if out_of_memory else ''}{unsaved}. "
            f"Resume from {saved or 'the start (no checkpoint yet)'} with resume=latest and the same out."
        )

    def _interrupted(self) -> None:
        """Ctrl-C: checkpoint what is safe to, close the MLflow run as KILLED, and say how to resume."""
        state = self.state
        resumable = _checkpoint_on_interrupt(self.checkpointer, state, at_boundary=not self.micro_losses)
        self.write_trained_clips()  # a resume cuts it back to its checkpoint
        self.tracker.finish("KILLED")
        if self.accelerator.is_main_process:
            where = f"{resumable} (step {saved_step(resumable)})" if resumable else "none (it starts over)"
            print(
                f"\ninterrupted at step {state.step}; checkpoint to resume from: {where}. Continue with the same out "
                f"folder and --set resume=latest.",
                file=sys.stderr,
                flush=True,
            )

    def finish(self) -> TrainResult:
        """What this rank saw (added to a resumed run's), the final weights, and the MLflow run closed."""
        accelerator, state, layout = self.accelerator, self.state, self.layout
        self.write_trained_clips()
        self.selection = self.best.select(self.params.select_checkpoint, state.step)
        ema = self.ema
        if accelerator.is_main_process and self.selection.step != state.step:
            self.best.load_best(self.trainable)  # already the EMA's, when kept
            ema = None
        if accelerator.is_main_process and self.best.plot(layout.heldout_curve, self.selection):
            self.tracker.log_artifacts(layout.best, "heldout")
            self.tracker.log_metrics({"selected_step": self.selection.step}, state.step)
        if self.params.training_type == "full":  # the whole denoiser is saved: swapped weights from their host copies
            for swap in self.swaps.values():
                swap.release()
        weights = _export(
            self.job, self.family, self.pipe, self.denoisers, accelerator, self.trainable, ema, state, self.selection
        )
        self.tracker.log_metrics({"final_loss": state.losses[-1]}, state.step)
        self.tracker.finish()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(
            layout.root,
            weights,
            state.step,
            state.losses,
            self.tracker.run_id,
            self.rate,
            peak_memory_mb(accelerator.device),
            sorted(layout.checkpoints.glob("checkpoint-*")),
            self.selection.as_dict(),
            layout.heldout_curve if layout.heldout_curve.is_file() else None,
        )


def _cut(clip_ids: list, buckets: list, timesteps: list, batches: int) -> tuple[list, list, list]:
    """A trained_clips record (clip ids flat; buckets and levels per micro-batch) up to micro-batch `batches`."""
    timesteps = timesteps[: min(batches, len(buckets))]
    clips = sum(len(levels) for levels in timesteps)  # one level per clip of each micro-batch
    return clip_ids[:clips], buckets[:batches], timesteps


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def average_gradients(grads: list[torch.Tensor], world: int) -> None:
    """Replace each gradient by its mean over the `world` ranks, as DDP's all-reduce makes it (summed in buckets of
    at most `GRADIENT_BUCKET` elements of one dtype, then divided)."""
    for bucket in _gradient_buckets(grads, GRADIENT_BUCKET):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's out of memory, and the libraries' allocation failures that reach us as RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or _says_out_of_memory(str(error))


def _says_out_of_memory(text: str) -> bool:
    return any(
        words in text.lower() for words in ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")
    )


def _without_frames(error: Exception) -> Exception:
    """Out of memory: the traceback dropped, as its frames hold the step's activations (the checkpoint and a
    Prefect worker's or notebook's next run need that memory); any other error keeps its traceback."""
    return error.with_traceback(None) if _out_of_memory(error) else error


def _gradient_buckets(grads: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most `limit` elements per bucket (unless one is larger)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        other_kind = bucket and (grad.dtype, grad.device) != (bucket[0].dtype, bucket[0].device)
        if bucket and (other_kind or size + grad.numel() > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def _rng_states() -> dict:
    """The generators a step draws from (what accelerate's checkpoint saves), to give a failed step's draws back."""
    import numpy as np

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore_rng(states: dict) -> None:
    import numpy as np

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


def train(job: TrainJob, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run `job` to its last step (resuming when it says so); see `Trainer` for the phases."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # before the first CUDA allocation
    return Trainer(job, on_step).run()


def _checkpoint_on_interrupt(checkpointer: Checkpointer, state: TrainState, at_boundary: bool) -> Path | None:
    """On Ctrl-C, save the steps done since the last checkpoint when that is safe (one process, between optimizer
    steps); return the checkpoint a resume starts from."""
    latest = checkpointer.latest()
    if (
        at_boundary
        and state.step > (saved_step(latest) if latest else 0)
        and checkpointer.accelerator.num_processes == 1
    ):
        return checkpointer.save(state)
    return latest


def pipe_without_text_encoders(job: TrainJob) -> bool:
    """Training from the cache with the validation prompts embedded too needs no text encoder at all."""
    return job.data_source == "cache" and job.prompt_cache is not None


@contextmanager
def _exported_weights(ema, trainable: list[torch.nn.Parameter]) -> Iterator[None]:
    """The EMA's weights in the trained parameters for the block, when an EMA is kept (what export would write)."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


@contextmanager
def _evaluating(modules: list[torch.nn.Module]) -> Iterator[None]:
    """`modules` in eval mode (no LoRA dropout) for the block, then training again."""
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module in modules:
            module.train()


@contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """`modules` on `device` for the block, then back where each was (the VAE decoder and an expert that does not
    train: only while samples render)."""
    homes = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def _prepare_model(job: TrainJob, family: ModelFamily, device: torch.device, dtype: torch.dtype):
    """The pipeline in the weight dtype with the denoiser(s) on `device`, encoders frozen; the denoisers that train
    (pipeline attribute -> module: two for a two-expert model with experts=both) and their trainable parameters
    (named `<attribute>.<parameter>` except for the family's one denoiser). From the cache the text encoders are not
    loaded and the VAE stays on the CPU between samples; on the fly (data_source=shards) everything is on `device`."""
    params = job.params
    cached = pipe_without_text_encoders(job)
    pipe = family.load_pipeline(job.model, dtype=dtype, **(dict.fromkeys(family.text_encoders) if cached else {}))
    experts = model_experts(pipe, family.denoiser_name, params.experts)
    if boundary_ratio(pipe.config) is not None and params.training_type != "lora":
        raise ValueError(
            "training_type: full fine-tuning of a two-expert model (Wan 2.2 A14B) is not supported; use lora"
        )
    waiting = {"vae", "image_encoder"} if cached else set()  # the VAE's decoder, Wan 2.1 I2V's CLIP: for samples
    waiting |= set(idle_experts(pipe, experts))  # an expert not trained: only while samples render
    swapping = params.offload == "blocks"
    if params.blocks_to_swap == "auto":  # the finetune flow resolves it (memory_plan.check_before_training)
        raise ValueError(
            "blocks_to_swap: auto is resolved by the finetune flow against the GPU's memory; a train_job.json launched "
            "directly needs a number (`vidtune plan --model MODEL --vram 24GB` recommends one)"
        )
    for setting, value in (("offload", params.offload), ("compile", params.compile)):
        if value == "blocks" and not family.block_lists:
            raise ValueError(
                f"{setting}: {family.name}'s denoiser is not a chain of transformer blocks; use {setting}=none"
            )
    if params.attention_backend != "native":  # every denoiser, the idle expert too (it renders samples)
        for expert in model_experts(pipe, family.denoiser_name, None):
            getattr(pipe, expert.module).set_attention_backend(params.attention_backend)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)  # what trains is chosen below
            if name not in waiting and not (swapping and name in {e.module for e in experts}):
                component.to(device)
    denoisers, trainable, swaps = {}, {}, {}
    for expert in experts:
        denoiser = denoisers[expert.module] = getattr(pipe, expert.module)
        prefix = "" if expert.module == family.denoiser_name and len(experts) == 1 else f"{expert.module}."
        trainable |= {prefix + n: p for n, p in _make_denoiser_trainable(job, family, denoiser, dtype).items()}
        if params.compile == "blocks":
            compile_blocks(transformer_blocks(denoiser, family.block_lists))
        if swapping:  # after the adapter (made on the host), before the rest of the denoiser moves to the device
            swaps[expert.module] = BlockSwap(
                transformer_blocks(denoiser, family.block_lists), params.blocks_to_swap, device
            )
            denoiser.to(device)
    return pipe, denoisers, trainable, swaps


def _make_denoiser_trainable(job: TrainJob, family: ModelFamily, denoiser, dtype) -> dict[str, torch.nn.Parameter]:
    """Float8 storage, the adapter or unfrozen weights, the ComfyUI name check and checkpointing of one denoiser."""
    params = job.params
    store_fp8(denoiser, params.fp8, family.block_lists, dtype)  # before the adapter: LoRA is made in fp32
    trainable = make_trainable(family, denoiser, params)
    comfyui = comfyui_export(family, job.export_comfyui) if params.training_type == "lora" else None
    if comfyui is not None:  # before any step: a module ComfyUI cannot name is refused now, not after training
        comfyui.check(list(lora_modules_of(denoiser)))
    if params.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return trainable


def _with_text_encoders(family: ModelFamily, pipe, model: str):
    """The pipeline with the text encoders a cached run left out, loaded now (on the CPU) from the base model: a
    saved full fine-tune is a whole pipeline."""
    if all(getattr(pipe, name, None) is not None for name in family.text_encoders):
        return pipe
    loaded = {name: part for name, part in pipe.components.items() if part is not None}
    return family.load_pipeline(model, dtype=pipe.vae.dtype, **loaded)


def _optimization(params: TrainParams, trainable: list[torch.nn.Parameter], accelerator):
    """Optimizer, diffusers learning-rate schedule and (optional) EMA of the trained weights."""
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(trainable, params, accelerator.device)
    scheduler = get_scheduler(
        params.lr_scheduler,
        optimizer,
        num_warmup_steps=params.warmup_steps * accelerator.num_processes,
        num_training_steps=params.max_steps * accelerator.num_processes,
    )  # accelerate steps the schedule once per process
    ema = None
    if params.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=params.ema_decay)
    return optimizer, scheduler, ema


def _apply(accelerator, trainable: list, optimizer, scheduler, max_grad_norm: float | None):
    """After the backward, on the last batch of an accumulation: clip, step, zero. Returns the gradient norm then."""
    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    optimizer.step()  # accelerate's wrappers skip these until the accumulation is complete
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _export(
    job: TrainJob, family: ModelFamily, pipe, denoisers: dict, accelerator, trainable: dict, ema, state, selection
) -> Path:
    """The selected weights (the EMA when kept), written by the main process; `selection` says which and why."""
    params = job.params
    weights = RunLayout(Path(job.out)).weights(params.training_type)
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(list(trainable.values()))
        info = {
            "base_model": job.model,
            "family": family.name,
            "training_type": params.training_type,
            "steps": state.step,
            "final_loss": state.losses[-1],
            "mlflow_run_id": state.mlflow_run_id,
            "checkpoint": selection.as_dict(),
        }
        if params.training_type == "lora":
            save_lora_adapter(family, pipe, denoisers, weights, info)
            if comfyui_export(family, job.export_comfyui) is not None:
                for module, denoiser in denoisers.items():
                    export_comfyui(family, denoiser, weights / comfyui_file(module, family.denoiser_name))
        else:
            save_full_model(_with_text_encoders(family, pipe, job.model), weights, info)
    accelerator.wait_for_everyone()
    return weights
