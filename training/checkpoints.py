"""Resumable checkpoints: accelerate's state (optimizer, LR schedule, every rank's RNG) plus only the trained
weights (not the frozen base model), the EMA and the trainer's own state (step, data position, MLflow run).
Each is written to a hidden folder and renamed into place, so a crash mid-save leaves the previous one intact."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidtune.training.files import write_json_atomic

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed per rank: the data position
    samples: int = 0  # clips trained on, all ranks
    mlflow_run_id: str | None = None
    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over ranks and accumulation
    # What the data position and the learning-rate schedule depend on (None in checkpoints of older runs).
    data_layout: dict | None = None


def data_layout(world_size: int, params) -> dict:
    """The settings a resume must keep: the global order deals batches to world_size x data_workers readers, and a
    step is batch_size x gradient_accumulation_steps x world_size clips."""
    return {
        "world_size": world_size,
        "batch_size": params.batch_size,
        "gradient_accumulation_steps": params.gradient_accumulation_steps,
        "data_workers": params.resolved_data_workers(),
    }


def check_resumable(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Refuse, naming each setting, a resume whose data layout differs from the checkpoint's."""
    if saved is None:
        return
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if key in saved and saved[key] != now[key]]
    if changed:
        raise ValueError(
            f"resume: {checkpoint} was trained with other settings ({', '.join(changed)}); the data position and the "
            "learning-rate schedule would not continue where they stopped. Resume with the checkpoint's settings "
            "(num_processes, batch_size, gradient_accumulation_steps, data_workers), or start a new run folder"
        )


def find_latest(root: Path) -> Path | None:
    found = sorted(root.glob("checkpoint-*"))
    return found[-1] if found else None


def saved_step(checkpoint: Path) -> int:
    """The optimizer steps a checkpoint holds."""
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """`latest` -> newest checkpoint under `root` (None when there is none yet); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        return find_latest(root)
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume: {path} is not a vidtune checkpoint (no {STATE_FILE}); checkpoints are under {root}")
    return path


class Checkpointer:
    def __init__(self, root: Path, accelerator, trainable: dict[str, torch.nn.Parameter], ema=None, keep: int = 3):
        self.root, self.accelerator, self.trainable, self.ema, self.keep = root, accelerator, trainable, ema, keep
        self.saved_at = 0  # the step of the last checkpoint saved or loaded (known alike on every rank)
        # accelerate would save and load the whole denoiser; the trained tensors are saved here instead.
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def latest(self) -> Path | None:
        return find_latest(self.root)

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.root / f"checkpoint-{state.step:06d}"
        tmp = self.root / f".checkpoint-{state.step:06d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            save_file(
                {name: p.detach().contiguous().cpu() for name, p in self.trainable.items()},
                tmp / "trainable.safetensors",
            )
            if self.ema is not None:
                save_file(
                    {f"shadow.{i}": t.contiguous().cpu() for i, t in enumerate(self.ema.shadow_params)},
                    tmp / "ema.safetensors",
                )
                write_json_atomic(tmp / "ema.json", {"optimization_step": self.ema.optimization_step})
            write_json_atomic(tmp / STATE_FILE, asdict(state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.root.glob("checkpoint-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.saved_at = state.step
        return final

    def load(self, path: Path) -> TrainState:
        self.accelerator.load_state(str(path))
        saved = load_file(path / "trainable.safetensors")
        missing = sorted(set(self.trainable) - set(saved))
        if missing:
            raise ValueError(
                f"resume: {path} was trained with other settings (it lacks {missing[0]}); start a new run folder"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(saved[name].to(param.device, param.dtype))
        if self.ema is not None and (path / "ema.safetensors").is_file():
            shadow = load_file(path / "ema.safetensors")
            self.ema.shadow_params = [shadow[f"shadow.{i}"].to(p.device) for i, p in enumerate(self.ema.shadow_params)]
            self.ema.optimization_step = json.loads((path / "ema.json").read_text())["optimization_step"]
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        self.saved_at = state.step
        return state
