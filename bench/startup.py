"""Start-up cost of small jobs, side by side in one run: `vidtune curate` as users type it against
PySceneDetect's own CLI (`scenedetect -i V detect-content split-video`), on one short clip and on 12 videos.

    (a) scenedetect on one 6 s 1280x544 clip (median of 3)
    (b) the first `vidtune curate` on a new machine: no local Prefect server yet (a new database), no worker
    (c) `vidtune curate` again (warm: the local server and the warm worker are up; median of 3, new outputs)
    (d) the same with VIDTUNE_WORKER=0 (server up, imports and models paid in the command)
    (e) scenedetect over 12 10 s 1280x544 videos, two at a time; (f) one warm `vidtune curate` of the folder

curate runs with its defaults (clips 832x480 @ 16 fps) and a ViT-B-32 CLIP of random weights from a file (the
real model's size and load time; nothing is downloaded). Targets: c/a <= 3, f/e <= 0.5.

    .venv/bin/python bench/startup.py [--workdir bench-run/startup]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from curate import ffmpeg_on_path, scenedetect_cli  # bench/curate.py

VIDTUNE = str(Path(sys.executable).with_name("vidtune"))


def render_inputs(workdir: Path) -> tuple[Path, Path]:
    from vidtune.tasks.synthetic_videos import render_video

    short, folder = workdir / "short" / "clip.mp4", workdir / "twelve"
    if not short.exists():
        render_video(short, seconds=6, fps=24, width=1280, height=544, shots=2, crf=19, preset="veryfast", seed=7)
    for i in range(12):
        path = folder / f"raw_{i:02d}.mp4"
        if not path.exists():
            print(f"  rendering {path.name}", flush=True)
            render_video(
                path,
                seconds=10,
                fps=(24, 25, 30)[i % 3],
                width=1280,
                height=544,
                shots=3 + i % 3,
                crf=19,
                preset="veryfast",
                seed=300 + i,
            )
    return short, folder


def clip_weights(workdir: Path) -> Path:
    """ViT-B-32 with random weights, saved the way a user's downloaded file is."""
    path = workdir / "models" / "vit-b-32-random.safetensors"
    if not path.exists():
        import open_clip
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}, str(path))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_run(command: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-run/startup"))
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    print("inputs:", flush=True)
    short, folder = render_inputs(workdir)
    weights = clip_weights(workdir)
    ffmpeg_on_path(workdir / "bin")
    scratch = workdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)

    home = scratch / "home"  # a new machine: no server database, no worker
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "VIDTUNE_WORKER")}
    env |= {
        "VIDTUNE_HOME": str(home),
        "PREFECT_HOME": str(scratch / "prefect-home"),
        "VIDTUNE_SERVER_PORT": str(free_port()),
    }
    sets = ["--set", "scores.clip_model=ViT-B-32", "--set", f"scores.clip_pretrained={weights}"]
    results: dict[str, float] = {}
    try:
        print("timings:", flush=True)
        results["a"] = statistics.median(
            timed_run(scenedetect_cli(short, scratch / f"sd-{i}", command_only=True), env, scratch) for i in range(3)
        )
        print(f"  (a) scenedetect, one clip: {results['a']:.2f} s", flush=True)
        results["b"] = timed_run([VIDTUNE, "curate", str(short), str(scratch / "cold"), *sets], env, scratch)
        print(f"  (b) vidtune curate, first run on a new machine: {results['b']:.2f} s", flush=True)
        results["c"] = statistics.median(
            timed_run([VIDTUNE, "curate", str(short), str(scratch / f"warm-{i}"), *sets], env, scratch)
            for i in range(3)
        )
        print(f"  (c) vidtune curate, warm: {results['c']:.2f} s", flush=True)
        results["d"] = timed_run(
            [VIDTUNE, "curate", str(short), str(scratch / "no-worker"), *sets], env | {"VIDTUNE_WORKER": "0"}, scratch
        )
        print(f"  (d) vidtune curate, server up, no worker: {results['d']:.2f} s", flush=True)
        videos = sorted(folder.glob("*.mp4"))
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            list(
                pool.map(
                    lambda p: timed_run(scenedetect_cli(p, scratch / "sd12", command_only=True), env, scratch), videos
                )
            )
            results["e"] = time.perf_counter() - started
        print(f"  (e) scenedetect, 12 videos: {results['e']:.2f} s", flush=True)
        results["f"] = timed_run([VIDTUNE, "curate", str(folder), str(scratch / "twelve"), *sets], env, scratch)
        print(f"  (f) vidtune curate, 12 videos, warm: {results['f']:.2f} s", flush=True)
    finally:
        subprocess.run([VIDTUNE, "server", "stop"], env=env, capture_output=True)

    print(f"\n{'leg':52s} {'wall s':>7s}")
    labels = {
        "a": "(a) scenedetect split-video, one 6 s clip",
        "b": "(b) vidtune curate, first run (new server + worker)",
        "c": "(c) vidtune curate, warm",
        "d": "(d) vidtune curate, VIDTUNE_WORKER=0",
        "e": "(e) scenedetect split-video, 12 x 10 s",
        "f": "(f) vidtune curate, 12 x 10 s, warm",
    }
    for key, label in labels.items():
        print(f"{label:52s} {results[key]:7.2f}")
    print(
        f"\nc/a = {results['c'] / results['a']:.2f}  (target <= 3)   b/a = {results['b'] / results['a']:.1f}   d/a = {results['d'] / results['a']:.1f}"
    )
    print(f"f/e = {results['f'] / results['e']:.2f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
