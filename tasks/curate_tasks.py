"""The curate flow's Prefect tasks: thin wrappers around the curation stages (names for the UI; retries for
transient I/O only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vidtune.evaluation.report import curate_summary_markdown
from vidtune.tasks.annotate import embedding_path
from vidtune.tasks.captions import CaptionParams, find_mapping_file, load_caption_mapping, sidecar_caption
from vidtune.tasks.discover import identify_source, list_input_paths
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.manifest import curate_stats, read_manifest, write_manifest, write_stats
from vidtune.tasks.output import OutputLayout, prepare_output
from vidtune.tasks.plots import write_score_histograms
from vidtune.tasks.preflight import check_models
from vidtune.tasks.progress import progress_artifact
from vidtune.tasks.records import ClipRecord, Source, SourceResult, Status
from vidtune.tasks.report import write_report
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.shards import ShardParams, pack_shards
from vidtune.tasks.source import SourceSettings, curate_source

# Errors that say something about the input, not the infrastructure: retrying cannot help.
_PERMANENT = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry only network/disk hiccups (timeouts, connection resets, remote-store errors)."""
    try:
        state.result()
    except (TimeoutError, ConnectionError):
        return True
    except OSError as exc:
        return not isinstance(exc, _PERMANENT)
    except Exception:
        return False
    return False


_io_task = dict(
    retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_on_transient_io, cache_policy=NO_CACHE
)


@task(name="identify-source", task_run_name="identify {path}", **_io_task)
def identify_source_task(path: str, download_dir: Path) -> Source:
    return identify_source(path, download_dir)


@task(name="curate-source", task_run_name="curate {source.path}", **_io_task)
def curate_source_task(source: Source, settings: SourceSettings, staging_root: Path) -> SourceResult:
    return curate_source(source, settings, staging_root)


@task(name="check-models", cache_policy=NO_CACHE)
def check_models_task(captions: CaptionParams, scores: ScoreParams) -> None:
    check_models(captions, scores)


@task(name="prepare-output", cache_policy=NO_CACHE)
def prepare_output_task(output: str, clip_settings: dict, overwrite: bool, defaults: dict) -> OutputLayout:
    return prepare_output(Path(output), clip_settings, overwrite, defaults)


@task(name="discover", cache_policy=NO_CACHE)
def discover_task(input_path: str, images: bool = True) -> list[str]:
    return list_input_paths(input_path, images)


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
    return stats


@task(name="write-report", cache_policy=NO_CACHE)
def write_report_task(layout: OutputLayout) -> Path:
    rows = read_manifest(layout.manifest)  # the page shows exactly the manifest, in its order
    clips = sum(bool(r.clip_id) for r in rows)
    get_run_logger().info("report.html: thumbnails of %d clips", clips)
    with progress_artifact("report-progress", clips, f"report.html: thumbnails of {clips} clips") as report:
        return write_report(rows, layout, report)


@task(name="curate-summary", cache_policy=NO_CACHE)
def publish_curate_summary_task(summary: dict) -> None:
    output = Path(summary["output"])
    create_markdown_artifact(
        curate_summary_markdown(summary, output), key="curate-summary", description=f"curate: {output}"
    )
