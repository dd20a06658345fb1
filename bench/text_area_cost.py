"""What the OCR text-area score (scores.text_area) adds to curating one source, side by side on this machine.

Each 1280x720 input is curated twice by the same stage code the flow runs (no Prefect): the default scores (CLIP
ViT-B-32 with random weights: the real model's compute; motion) and the same plus `text_area`. The runs alternate
per video so that load from other processes hits both alike. Prints wall and CPU seconds (all threads of this
process) per clip for both, and the difference.

    .venv/bin/python bench/text_area_cost.py [--videos 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from curate import make_inputs  # bench/curate.py: the same rendered 1280x720 inputs

import vidtune.tasks  # noqa: F401  (Prefect defaults)
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.clips import ClipParams
from vidtune.tasks.discover import identify_source
from vidtune.tasks.records import Status
from vidtune.tasks.scenes import SceneParams
from vidtune.tasks.scoring import ScoreParams
from vidtune.tasks.source import SourceSettings, curate_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=Path("bench-run"))
    args = parser.parse_args()

    paths = make_inputs(args.workdir / "raw", args.videos, args.seconds)
    scratch = Path(tempfile.mkdtemp(prefix="vidtune-bench-", dir=args.workdir))
    base = ScoreParams(clip_pretrained=None, device="cpu")
    variants = {"default scores": base, "+ text_area": base.model_copy(update={"text_area": True})}
    captions = CaptionParams(trigger="sks")
    seconds = {name: [0.0, 0.0] for name in variants}  # wall, CPU
    clips = dict.fromkeys(variants, 0)
    for name, scores in variants.items():  # load the models outside the timings
        from vidtune.tasks.annotate import Annotators

        Annotators.load(captions, scores)
    for path in paths:
        source = identify_source(str(path), scratch / "downloads")
        for name, scores in variants.items():
            settings = SourceSettings(SceneParams(), ClipParams(), captions, scores)
            wall, cpu = time.perf_counter(), time.process_time()
            result = curate_source(source, settings, scratch / name)
            seconds[name][0] += time.perf_counter() - wall
            seconds[name][1] += time.process_time() - cpu
            clips[name] += sum(r.status == Status.KEPT for r in result.rows if r.clip_id)
    print(f"{'scores':20s} {'clips':>6s} {'wall s/clip':>12s} {'CPU s/clip':>11s}")
    for name in variants:
        wall, cpu = (s / clips[name] for s in seconds[name])
        print(f"{name:20s} {clips[name]:6d} {wall:12.3f} {cpu:11.3f}")
    for k, unit in enumerate(("wall", "CPU")):
        default, text = (seconds[n][k] / clips[n] for n in variants)
        print(f"text_area adds {text - default:.3f} {unit} s per clip: {100 * (text / default - 1):+.0f} %")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
