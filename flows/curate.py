"""The `curate` flow: raw videos -> captioned, scored, filtered scene clips in WebDataset shards + manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.flows.progress import progress_bar
from vidtune.flows.runners import Runner, make_task_runner
from vidtune.tasks.annotate import embedding_path
from vidtune.tasks.captions import (
    CaptionParams,
    find_mapping_file,
    load_caption_mapping,
    sidecar_caption,
)
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.curate_tasks import curate_source_task, identify_source_task
from vidtune.tasks.discover import list_video_paths, mark_duplicates
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.manifest import curate_stats, curate_summary_markdown, write_manifest, write_stats
from vidtune.tasks.output import OutputLayout, prepare_output
from vidtune.tasks.plots import write_score_histograms
from vidtune.tasks.preflight import check_models
from vidtune.tasks.records import ClipRecord, Source, Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.shards import ShardParams, pack_shards
from vidtune.tasks.source import SourceSettings


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
        return self

    def source_settings(self) -> SourceSettings:
        return SourceSettings(self.scenes, self.clips, self.captions, self.scores)


@task(name="check-models", cache_policy=NO_CACHE)
def check_models_task(captions: CaptionParams, scores: ScoreParams) -> None:
    check_models(captions, scores)


@task(name="prepare-output", cache_policy=NO_CACHE)
def prepare_output_task(params: CurateParams) -> OutputLayout:
    # Everything that shapes staged rows; filter thresholds are left out so they can change between runs.
    settings = {name: getattr(params, name).model_dump() for name in ("scenes", "clips", "captions", "scores")}
    return prepare_output(Path(params.output), settings, params.overwrite)


@task(name="discover", cache_policy=NO_CACHE)
def discover_task(input_path: str) -> list[str]:
    return list_video_paths(input_path)


@task(name="read-sidecar-captions", cache_policy=NO_CACHE)
def attach_sidecars_task(sources: list[Source], input_path: str, captions: CaptionParams) -> list[Source]:
    mapping_file = captions.sidecar_file or find_mapping_file(input_path)
    mapping = load_caption_mapping(mapping_file) if mapping_file else {}
    return [
        dataclasses.replace(s, sidecar=sidecar_caption(s.path, input_path, mapping)) if not s.error else s
        for s in sources
    ]


@task(name="filter-clips", cache_policy=NO_CACHE)
def filter_clips_task(rows: list[ClipRecord], layout: OutputLayout, filters: FilterParams) -> list[ClipRecord]:
    def embedding_of(row):
        return np.load(embedding_path(layout.staging / row.source_sha256, row.clip_id))

    return apply_filters(rows, filters, embedding_of)


@task(name="pack-shards", cache_policy=NO_CACHE)
def pack_shards_task(rows: list[ClipRecord], layout: OutputLayout, params: ShardParams) -> list[ClipRecord]:
    def clip_file(row):
        return layout.staging / row.source_sha256 / f"{row.clip_id}.mp4"

    shard_of = pack_shards(rows, clip_file, layout.shards, params)
    return [dataclasses.replace(r, shard=shard_of.get(r.clip_id) if r.status == Status.KEPT else None) for r in rows]


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest_task(
    rows: list[ClipRecord], layout: OutputLayout, durations: dict, resumed: int, filters: FilterParams
) -> dict:
    write_manifest(rows, layout.manifest)
    write_score_histograms(rows, filters, layout.root)
    stats = curate_stats(rows, durations, resumed, shards=len(layout.shard_files()))
    write_stats(stats, layout.stats)
    create_markdown_artifact(
        curate_summary_markdown(stats, layout.root), key="curate-summary", description=f"curate: {layout.root}"
    )
    return stats


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


@flow(name="curate", log_prints=True, validate_parameters=True)
def curate(params: CurateParams) -> dict:
    """Raw videos in, clips out: discover, hash, detect scenes, extract, caption, score, filter, shard."""
    logger = get_run_logger()
    paths = discover_task(params.input)
    logger.info("found %d video files under %s", len(paths), params.input)
    check_models_task(params.captions, params.scores)  # before any video is decoded
    layout = prepare_output_task(params)

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
    logger.info("kept %d clips in %d shards at %s", stats["clips"]["kept"], stats["shards"], layout.shards)
    return {**stats, "output": str(layout.root), "manifest": str(layout.manifest)}
