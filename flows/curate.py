"""The `curate` flow: raw videos -> captioned, scored, filtered scene clips in WebDataset shards + manifest."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.flows.names import run_name
from vidtune.flows.progress import progress_bar
from vidtune.flows.runners import Runner, make_task_runner
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.curate_tasks import (
    attach_sidecars_task,
    check_models_task,
    curate_source_task,
    discover_task,
    filter_clips_task,
    identify_source_task,
    pack_shards_task,
    prepare_output_task,
    publish_curate_summary_task,
    write_manifest_task,
    write_report_task,
)
from vidtune.tasks.discover import mark_duplicates
from vidtune.tasks.filters import FilterParams
from vidtune.tasks.records import ClipRecord, Source, Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.shards import ShardParams
from vidtune.tasks.source import SourceSettings

CLIP_SETTINGS = ("scenes", "clips", "captions", "scores")  # what shapes staged rows: fixed for an OUTPUT


class CurateParams(BaseModel):
    """Everything `vidtune curate` takes: the Prefect UI form, the YAML `--config` schema and the `--set` target."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="Folder (searched recursively), single file, or fsspec URL of raw videos.")
    output: str = Field(description="Dataset folder: shards/, manifest.parquet, stats.json.")
    scenes: SceneParams = Field(default_factory=SceneParams)
    clips: ClipParams = Field(default_factory=ClipParams)
    captions: CaptionParams = Field(default_factory=CaptionParams)
    scores: ScoreParams = Field(default_factory=ScoreParams)
    filters: FilterParams = Field(default_factory=FilterParams)
    shards: ShardParams = Field(default_factory=ShardParams)
    workers: int = Field(2, ge=1, le=256, description="Sources processed in parallel (threads or local processes).")
    runner: Runner = Field("threads", description="threads (one machine), dask or ray (a cluster).")
    runner_address: str | None = Field(None, description="Scheduler address for dask/ray, e.g. tcp://10.0.0.5:8786.")
    overwrite: bool = Field(False, description="Replace OUTPUT if it was curated with different clip settings.")

    @model_validator(mode="after")
    def _consistent(self) -> CurateParams:
        if self.scenes.min_clip_s * self.clips.fps < 1:
            raise ValueError(
                f"scenes.min_clip_s ({self.scenes.min_clip_s}) is shorter than one frame at clips.fps ({self.clips.fps})"
            )
        needs_clip = [name for name in ("min_clip_score", "dedup_threshold") if getattr(self.filters, name) is not None]
        if needs_clip and not self.scores.clip:
            raise ValueError(f"filters.{needs_clip[0]} needs the CLIP score, but scores.clip is false")
        if self.filters.max_text_area is not None and not self.scores.text_area:
            raise ValueError("filters.max_text_area needs the text-area score: set scores.text_area=true")
        if self.filters.min_aesthetic is not None and not self.scores.aesthetic_head:
            raise ValueError("filters.min_aesthetic needs scores.aesthetic_head (a LAION aesthetic head file or URL)")
        return self

    def source_settings(self) -> SourceSettings:
        return SourceSettings(self.scenes, self.clips, self.captions, self.scores)

    def clip_settings(self) -> dict:
        """Everything that shapes staged rows; filter thresholds are left out so they can change between runs."""
        return {name: getattr(self, name).model_dump() for name in CLIP_SETTINGS}

    @staticmethod
    def default_clip_settings() -> dict:
        return {name: CurateParams.model_fields[name].default_factory().model_dump() for name in CLIP_SETTINGS}


def _run_per_source(task_, over: dict[str, list], label: str, runner: TaskRunner, **shared) -> list:
    """Submit `task_` once per item of `over` ({parameter: items}) on `runner`; a progress bar (and the Prefect
    progress artifact `{label}-progress`) advances as each finishes. Returns the final states, in input order."""
    ((name, items),) = over.items()
    with runner, progress_bar(label, total=len(items), key=f"{label}-progress") as advance:
        futures = [runner.submit(task_, parameters={name: item, **shared}) for item in items]
        for future in as_completed(futures):
            future.wait()
            advance()
        return [f.state for f in futures]


@flow(
    name="curate",
    flow_run_name=run_name("curate", ("params", "output"), folder=True),
    log_prints=True,
    validate_parameters=True,
)
def curate(params: CurateParams) -> dict:
    """Raw videos in, clips out: discover, hash, detect scenes, extract, caption, score, filter, shard."""
    logger = get_run_logger()
    paths = discover_task(params.input, params.clips.images)
    logger.info("found %d video and image files under %s", len(paths), params.input)
    check_models_task(params.captions, params.scores)  # before any video is decoded
    layout = prepare_output_task(
        params.output, params.clip_settings(), params.overwrite, CurateParams.default_clip_settings()
    )

    states = _run_per_source(
        identify_source_task,
        {"path": paths},
        "hashing",
        ThreadPoolTaskRunner(params.workers),
        download_dir=layout.downloads,
    )
    sources = mark_duplicates(
        [
            st.result() if st.is_completed() else Source(p, None, 0, error=f"unreadable: {st.message}")
            for p, st in zip(paths, states)
        ]
    )
    sources = attach_sidecars_task(sources, params.input, params.captions)

    runner = make_task_runner(params.runner, params.runner_address, params.workers)
    states = _run_per_source(
        curate_source_task,
        {"source": sources},
        "curating",
        runner,
        settings=params.source_settings(),
        staging_root=layout.staging,
    )
    rows, durations, resumed = [], {}, 0
    for source, state in zip(sources, states):
        if not state.is_completed():  # retries exhausted: still a record, never a crash
            rows.append(ClipRecord.for_source(source, Status.FAILED, f"task failed after retries: {state.message}"))
            continue
        result = state.result()
        rows += result.rows
        durations[source.path] = result.duration_s
        resumed += result.resumed
    if resumed:
        logger.info("skipped %d sources already curated by an earlier run", resumed)

    rows = filter_clips_task(rows, layout, params.filters)
    rows = pack_shards_task(rows, layout, params.shards)
    stats = write_manifest_task(rows, layout, durations, resumed, params.filters)
    report = write_report_task(layout)
    summary = {**stats, "output": str(layout.root), "manifest": str(layout.manifest), "report": str(report)}
    publish_curate_summary_task(summary)
    logger.info("kept %d clips in %d shards at %s", stats["clips"]["kept"], stats["shards"], layout.shards)
    return summary
