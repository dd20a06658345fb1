"""`vidtune demo`: the whole pipeline on generated videos, on one machine, with nothing to download."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from flows.cli import print_curate_summary
from flows.curate import CurateParams, curate
from tasks.clips import ClipParams
from tasks.scenes import SceneParams
from tasks.synthetic_videos import make_raw_video_set

# Small clips keep the CPU demo quick; real runs use the defaults (832x480 @ 16 fps for Wan 2.1).
DEMO_CLIPS = ClipParams(width=128, height=128, fps=8)
DEMO_SCENES = SceneParams(min_clip_s=1.0, max_clip_s=3.0)


def make_demo_inputs(raw: Path) -> None:
    """Synthetic raw videos plus two broken files, to show that bad input becomes a manifest row, not a crash."""
    if not any(raw.glob("*.mp4")):
        make_raw_video_set(raw, seconds=6.0)
    (raw / "broken").mkdir(parents=True, exist_ok=True)
    (raw / "broken" / "notes.mp4").write_text("this is a text file with a video extension\n")
    (raw / "broken" / "empty.mov").write_bytes(b"")


def run_demo(workdir: Path, console: Console) -> dict:
    workdir = workdir.resolve()
    raw, dataset = workdir / "raw", workdir / "dataset"
    console.rule("[bold]1. raw videos")
    make_demo_inputs(raw)
    console.print(f"{len(list(raw.rglob('*.*')))} files in {raw}", highlight=False)

    console.rule("[bold]2. curate")
    summary = curate(CurateParams(input=str(raw), output=str(dataset), clips=DEMO_CLIPS, scenes=DEMO_SCENES))
    print_curate_summary(summary, console)

    console.rule("[bold]next")
    console.print(
        f"shards:    {dataset}/shards/shard-*.tar (WebDataset: mp4 + txt + json per clip)\n"
        f"manifest:  {dataset}/manifest.parquet (every input, with status and reason)\n"
        "Prefect:   run `prefect server start` and open http://127.0.0.1:4200 to see the flow runs",
        highlight=False,
    )
    return summary
