"""What one training run is: the resolved job the `finetune` flow writes to RUN/train_job.json and every later stage
(the trainer under `accelerate launch`, evaluate, register, generate) reads. Its own module, below the trainer and
the run layout, so that both can import it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vidtune.training.files import write_json_atomic
from vidtune.training.layout import DatasetLayout, RunLayout
from vidtune.training.params import RunTarget, TrainParams


class TrainJob(RunTarget):
    """Everything one training run needs, resolved by the `finetune` flow (and written as JSON for accelerate):
    the run target with its family and tracking URI set, plus the data, the trainer's parameters and the held-out
    clips."""

    shards: list[str]
    prompt_cache: str | None = Field(
        None, description="validation prompts' embeddings (data_source=cache): no text encoder is loaded"
    )
    frame_buckets: list[int]
    sample_size: tuple[int, int, int] = Field(description="(frames, height, width) of validation samples by default")
    params: TrainParams
    holdout_clip_ids: list[str] = Field(
        default_factory=list, description="clips never trained on: evaluation's held-out set"
    )
    holdout_note: str | None = Field(
        None,
        description="how the held-out clips were chosen when not by whole sources (one source: its last scenes in "
        "time), or that they are fewer than evaluation wants; shown in the evaluation report",
    )
    train_clip_ids: list[str] | None = Field(
        None,
        description="the clips that may train: the manifest's kept clips that fit a bucket, held-out ones excluded "
        "(whatever else the cache holds); null: every clip of the shards (jobs written before this field)",
    )
    clip_repeats: dict[str, int] = Field(
        default_factory=dict,
        description="clip id -> times per epoch, from params.repeats and image_fraction (others: once; 0: left out)",
    )
    tags: dict[str, str] = Field(default_factory=dict)

    def curated_shards(self) -> list[str]:
        """The curated shards (video, not latents) the clips come from: the job's own when it encodes on the fly,
        else the dataset's (`tags["data"]`); none when unknown."""
        if self.data_source == "shards":
            return self.shards
        return DatasetLayout(Path(self.tags["data"])).shard_files() if "data" in self.tags else []

    def write(self) -> None:
        """RUN/train_job.json, atomically."""
        write_json_atomic(RunLayout(Path(self.out)).train_job, self.model_dump(mode="json"))

    @classmethod
    def read(cls, run: Path | str) -> TrainJob:
        path = RunLayout(Path(run)).train_job
        if not path.is_file():
            raise FileNotFoundError(f"run: {run} has no train_job.json; is it the --out folder of `vidtune finetune`?")
        return cls.model_validate_json(path.read_text())

    @classmethod
    def find(cls, run: Path | str) -> TrainJob | None:
        """The run's job when it has one (a run folder from elsewhere may not)."""
        return cls.read(run) if RunLayout(Path(run)).train_job.is_file() else None
