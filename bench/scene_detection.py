"""Scene detection accuracy on generated videos with known boundaries, side by side.

Compares PySceneDetect alone (our gradual/blank checks switched off) with vidtune's default detection, for the
ContentDetector and the AdaptiveDetector, and the learned TransNetV2 model with and without the blank-frame check:
hard-cut F1 within ±1 frame, and how many clips straddle a cut, fade or dissolve (the thing that ruins a training
clip). TransNetV2 runs on the GPU when there is one, else on the CPU (its s/video is then ~10x the others').

    .venv/bin/python bench/scene_detection.py [--videos 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vidtune.tasks.clips import ClipParams
from vidtune.tasks.extract import extract_clips
from vidtune.tasks.probe import probe_video
from vidtune.tasks.records import Source
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.synthetic_videos import render_video, score_cuts

CONFIGS = {
    "PySceneDetect content only": SceneParams(gradual_threshold=0, blank_std=0),
    "vidtune default (content)": SceneParams(),
    "PySceneDetect adaptive only": SceneParams(detector="adaptive", gradual_threshold=0, blank_std=0),
    "vidtune adaptive": SceneParams(detector="adaptive"),
    "TransNetV2 only": SceneParams(detector="transnetv2", blank_std=0),
    "vidtune transnetv2": SceneParams(detector="transnetv2"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vidtune-bench-scenes-"))
    videos = [
        render_video(
            work / f"v{seed}.mp4",
            seconds=8,
            fps=(24, 25, 30, 29.97)[seed % 4],
            width=(320, 256, 400)[seed % 3],
            height=(240, 256, 224)[seed % 3],
            shots=5,
            transition=("cut", "fade", "dissolve")[seed % 3],
            seed=seed,
        )
        for seed in range(args.videos)
    ]
    boundaries = sum(len(v.cuts) + len(v.transitions) for v in videos)
    print(
        f"{len(videos)} videos, {boundaries} boundaries ({sum(len(v.transitions) for v in videos)} fades/dissolves)\n"
    )
    print(f"{'detection':30s} {'cut F1':>7s} {'clips':>6s} {'crossing':>9s} {'s/video':>8s}")
    for name, params in CONFIGS.items():
        f1s, clips, crossing, started = [], 0, 0, time.perf_counter()
        for v in videos:
            source = Source(str(v.path), "0" * 64, 1, local_path=str(v.path))
            result = extract_clips(
                source, probe_video(str(v.path)), params, ClipParams(width=32, height=32, fps=4), work
            )
            f1s.append(score_cuts(result.cuts, v.cuts, v.transitions)[2])
            spans = [(r.start_frame, r.end_frame) for r in result.rows if r.clip_id]
            clips += len(spans)
            bounds = [(c - 1, c) for c in v.cuts] + v.transitions
            crossing += sum(1 for s, e in spans if any(s <= b and a < e for a, b in bounds))
        per_video = (time.perf_counter() - started) / len(videos)
        print(f"{name:30s} {sum(f1s) / len(f1s):7.3f} {clips:6d} {crossing:9d} {per_video:8.2f}")


if __name__ == "__main__":
    main()
