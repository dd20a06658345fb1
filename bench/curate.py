"""Curation throughput, side by side, in one run on this machine.

    (a) bare decode of every input with PyAV (the floor: nothing can curate faster than it decodes)
    (b) the path most users script today: `scenedetect -i V detect-content split-video` per video
        (PySceneDetect's CLI; needs an `ffmpeg` binary, skipped with a message when there is none)
    (c) `vidtune curate`: scene detection, clip extraction at the training size (832x480 @ 16 fps), template
        captions, CLIP score (tiny open_clip model) and motion score

(a) and (b) run `--workers` videos at a time, like (c). Prints wall times, clips, and the ratios c/a and c/b.

    .venv/bin/python bench/curate.py [--videos 12] [--seconds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av

import vidtune.tasks  # noqa: F401  (Prefect defaults)
from vidtune.tasks.synthetic_videos import render_video


def make_inputs(folder: Path, count: int, seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"raw_{i:02d}_{seconds:g}s.mp4"
        if not path.exists():
            print(f"  rendering {path.name}", flush=True)
            render_video(
                path,
                seconds=seconds,
                fps=(24, 25, 30)[i % 3],
                width=1280,
                height=720,
                shots=5 + i % 3,
                crf=19,
                preset="veryfast",
                grain=3.0,
                seed=1000 + i,
            )
        paths.append(path)
    return paths


def bare_decode(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def timed(label: str, fn):
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    print(f"  {label}: {elapsed:.1f} s", flush=True)
    return elapsed, result


def ffmpeg_on_path(bin_dir: Path) -> bool:
    """PySceneDetect's split-video runs an `ffmpeg` binary: the system's, else imageio-ffmpeg's (a dev
    dependency), linked into `bin_dir` at the front of PATH. Returns whether there is one."""
    if shutil.which("ffmpeg"):
        return True
    try:
        import imageio_ffmpeg
    except ImportError:
        return False
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "ffmpeg"
    if not link.exists():
        link.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return True


def scenedetect_cli(path: Path, out: Path, command_only: bool = False) -> int | list[str]:
    target = out / path.stem
    target.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("scenedetect")),
        "-q",
        "-i",
        str(path),
        "-o",
        str(target),
        "detect-content",
        "split-video",
    ]
    if command_only:
        return cmd
    subprocess.run(cmd, check=True, capture_output=True)
    return len(list(target.glob("*.mp4")))


def run_vidtune(inputs: Path, output: Path, workers: int, clip_weights: Path) -> dict:
    from vidtune.flows.curate import CurateParams, curate
    from vidtune.tasks.scoring import ScoreParams
    from vidtune.training.tiny_models import TINY_CLIP

    params = CurateParams(
        input=str(inputs),
        output=str(output),
        workers=workers,
        captions={"trigger": "in sks style"},
        scores=ScoreParams(clip_model=TINY_CLIP, clip_pretrained=str(clip_weights)),
    )
    return curate(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-run"))
    parser.add_argument("--skip-scenedetect", action="store_true", help="Leave out (b), e.g. while iterating on (c).")
    args = parser.parse_args()

    print("inputs:", flush=True)
    raw = args.workdir / "raw"
    paths = make_inputs(raw, args.videos, args.seconds)
    size_mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"  {len(paths)} videos x {args.seconds:g} s, 1280x720, 24-30 fps, {size_mb:.0f} MB\n")

    from vidtune.training.tiny_models import build_tiny_clip

    clip_weights = build_tiny_clip(args.workdir / "models" / "tiny-clip.safetensors")
    scratch = Path(tempfile.mkdtemp(prefix="vidtune-bench-", dir=args.workdir))
    pool = ThreadPoolExecutor(args.workers)

    print("timings:")
    t_a, frames = timed("(a) PyAV bare decode", lambda: sum(pool.map(bare_decode, paths)))
    t_b = clips_b = None
    if args.skip_scenedetect:
        print("  (b) skipped (--skip-scenedetect)")
    elif ffmpeg_on_path(args.workdir / "bin"):
        t_b, counts = timed(
            "(b) scenedetect detect-content split-video",
            lambda: list(pool.map(lambda p: scenedetect_cli(p, scratch / "b"), paths)),
        )
        clips_b = sum(counts)
    else:
        print("  (b) skipped: no `ffmpeg` (PySceneDetect's split-video needs it; pip install imageio-ffmpeg)")

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # server start is not part of the measurement
        t_c, summary = timed("(c) vidtune curate", lambda: run_vidtune(raw, scratch / "c", args.workers, clip_weights))

    print(f"\n{'path':45s} {'wall s':>8s} {'clips':>6s} {'x (a)':>7s}")
    print(f"{'(a) PyAV bare decode (' + str(frames) + ' frames)':45s} {t_a:8.1f} {'-':>6s} {1:7.2f}")
    if t_b is not None:
        print(f"{'(b) scenedetect CLI split-video':45s} {t_b:8.1f} {clips_b:6d} {t_b / t_a:7.2f}")
    print(f"{'(c) vidtune curate':45s} {t_c:8.1f} {summary['clips']['kept']:6d} {t_c / t_a:7.2f}")
    print(f"\nc/a = {t_c / t_a:.2f}  (target <= 3)")
    if t_b is not None:
        print(f"c/b = {t_c / t_b:.2f}  (target <= 0.5)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
