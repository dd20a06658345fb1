"""The `curate` flow: raw videos -> scene clips -> WebDataset shards + manifest.parquet + stats.json."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from flows.progress import progress_bar
from tasks.clips import ClipParams
from tasks.curate_tasks import curate_source_task, identify_source_task
from tasks.discover import list_video_paths, mark_duplicates
from tasks.manifest import curate_stats, write_manifest, write_stats
from tasks.output import OutputLayout, prepare_output
from tasks.records import ClipRecord, Source, Status
from tasks.scenes import SceneParams
from tasks.shards import ShardParams, pack_shards


class CurateParams(BaseModel):
    """Everything `vidtune curate` takes: the Prefect UI form, the YAML `--config` schema and the `--set` target."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="Folder (searched recursively), single file, or fsspec URL of raw videos.")
    output: str = Field(description="Dataset folder: shards/, manifest.parquet, stats.json.")
    scenes: SceneParams = Field(default_factory=SceneParams)
    clips: ClipParams = Field(default_factory=ClipParams)
    shards: ShardParams = Field(default_factory=ShardParams)
    workers: int = Field(2, ge=1, le=256, description="Sources processed in parallel.")
    overwrite: bool = Field(False, description="Replace OUTPUT if it was curated with different clip settings.")


@task(name="prepare-output", cache_policy=NO_CACHE)
def prepare_output_task(params: CurateParams) -> OutputLayout:
    settings = {"scenes": params.scenes.model_dump(), "clips": params.clips.model_dump()}
    return prepare_output(Path(params.output), settings, params.overwrite)


@task(name="discover", cache_policy=NO_CACHE)
def discover_task(input_path: str) -> list[str]:
    return list_video_paths(input_path)


@task(name="pack-shards", cache_policy=NO_CACHE)
def pack_shards_task(rows: list[ClipRecord], layout: OutputLayout, params: ShardParams) -> list[ClipRecord]:
    clip_file = lambda row: layout.staging / row.source_sha256 / f"{row.clip_id}.mp4"  # noqa: E731
    shard_of = pack_shards(rows, clip_file, layout.shards, params)
    for row in rows:
        row.shard = shard_of.get(row.clip_id) if row.status == Status.KEPT else None
    return rows


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest_task(rows: list[ClipRecord], layout: OutputLayout, durations: dict, resumed: int) -> dict:
    write_manifest(rows, layout.manifest)
    stats = curate_stats(rows, durations, resumed, shards=len(list(layout.shards.glob("shard-*.tar"))))
    write_stats(stats, layout.stats)
    return stats


def _run_per_source(task_, over: dict[str, list], label: str, workers: int, **shared) -> list:
    """Submit `task_` once per item of `over` ({parameter: items}) on a thread pool; a progress bar advances as
    each finishes. Returns the final states, in input order."""
    (name, items), = over.items()
    with ThreadPoolTaskRunner(max_workers=workers) as runner, progress_bar(label, total=len(items)) as advance:
        futures = [runner.submit(task_, parameters={name: item, **shared}) for item in items]
        for future in as_completed(futures):
            future.wait()
            advance()
        return [f.state for f in futures]


@flow(name="curate", log_prints=True, validate_parameters=True)
def curate(params: CurateParams) -> dict:
    """Raw videos in, scene clips out: discover, probe, detect scenes, extract clips, pack shards, write the manifest."""
    logger = get_run_logger()
    paths = discover_task(params.input)
    layout = prepare_output_task(params)
    logger.info("found %d video files under %s", len(paths), params.input)

    states = _run_per_source(identify_source_task, {"path": paths}, "hashing", params.workers, download_dir=layout.downloads)
    sources = mark_duplicates(
        [st.result() if st.is_completed() else Source(p, None, 0, error=f"unreadable: {st.message}") for p, st in zip(paths, states)]
    )

    states = _run_per_source(
        curate_source_task, {"source": sources}, "curating", params.workers,
        scenes=params.scenes, clips=params.clips, staging_root=layout.staging,
    )  # fmt: skip
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

    rows = pack_shards_task(rows, layout, params.shards)
    stats = write_manifest_task(rows, layout, durations, resumed)
    logger.info("kept %d clips in %d shards at %s", stats["clips"]["kept"], stats["shards"], layout.shards)
    return {**stats, "output": str(layout.root), "manifest": str(layout.manifest)}
