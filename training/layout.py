"""The two folders that cross stages, each spelled once here: a curated dataset (curate writes it; finetune,
precompute and evaluation read it) and a training run (finetune writes it; evaluate, register, generate and
`accelerate launch` read it). Every stage takes paths from these, not its own spelling; what a run is (its
train_job.json) is `vidtune.training.job.TrainJob`, which reads and writes that file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class DatasetLayout:
    """DATA/: `shards/shard-NNNNNN.tar`, `manifest.parquet` (every input, kept or with a reason), `stats.json`, and
    `latent_cache/` (the default latent cache root)."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def latent_cache(self) -> Path:
        return self.root / "latent_cache"

    def shard_files(self) -> list[str]:
        """The packed shards in order (in-progress `.shard-*.tmp` files are not shards)."""
        return sorted(str(p) for p in self.shards.glob("shard-*.tar"))


@dataclass(frozen=True)
class RunLayout:
    """RUN/: `train_job.json` (what the trainer ran), `adapter/` (LoRA) or `model/` (full), `checkpoints/`,
    `samples/step-N/` (`sample-NN` .mp4 and .gif; image-to-video: `image-NN.png`, what sample NN starts from),
    `trained_clips/`, the launcher's `train_{result,error,progress}.json`, and `evaluation/` (`metrics.json`,
    `report.md`, `contact_sheet.png`, `samples/`, and the registry's `gate.json`)."""

    root: Path

    @property
    def train_job(self) -> Path:
        return self.root / "train_job.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"  # the held-out curve by checkpoint and the weights of its lowest point

    @property
    def heldout_curve(self) -> Path:
        return self.root / "heldout_loss.png"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def step_samples(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}"

    def trained_clips(self, rank: int) -> Path:
        return self.root / "trained_clips" / f"rank-{rank:02d}.json"

    @property
    def result(self) -> Path:
        return self.root / "train_result.json"

    @property
    def error(self) -> Path:
        return self.root / "train_error.json"

    @property
    def progress(self) -> Path:
        return self.root / "train_progress.json"  # {"step": N}: how far the main process is, for the launching flow

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    @property
    def evaluation_samples(self) -> Path:
        return self.evaluation / "samples"  # base-NN / adapted-NN .mp4 and .gif; image-to-video: image-NN.png

    @property
    def contact_sheet(self) -> Path:
        return self.evaluation / "contact_sheet.png"

    @property
    def report(self) -> Path:
        return self.evaluation / "report.md"

    @property
    def gate(self) -> Path:
        return self.evaluation / "gate.json"

    @property
    def heldout_losses(self) -> Path:
        return (
            self.evaluation / "heldout_losses.json"
        )  # every draw's loss, base and adapted (evaluation.gate pairs them)

    def weights(self, training_type: str | None = None) -> Path:
        """`adapter/` for LoRA, `model/` for full fine-tuning; without a type, whichever the run has."""
        if training_type is not None:
            return self.adapter if training_type == "lora" else self.model
        return self.adapter if self.adapter.is_dir() else self.model

    def read_metrics(self) -> dict | None:
        return _read_json(self.metrics)
