"""`bench/real_size.py --gpu --dry-run`: every GPU leg (the 1.3B with and without checkpointing, fp8 cast and
scaled, each installed attention backend; the 14B with block swap) runs its real code path at tiny sizes on the
CPU, so the GPU measurement cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_size.py"


def test_the_gpu_legs_run_at_tiny_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "legs.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--gpu", "--dry-run", "--steps", "3", "--warmup", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    legs = {r["leg"]: r for r in json.loads(out.read_text())["gpu_legs"]}
    ran = {"1.3b-ckpt", "1.3b-no-ckpt", "1.3b-fp8-cast", "1.3b-fp8-scaled", "14b-swap-24gb", "14b-fp8-swap-24gb"}
    assert ran <= set(legs) and not [r for r in legs.values() if "error" in r]
    for name in ran:
        assert math.isfinite(legs[name]["loss"]) and legs[name]["s_per_step"] > 0 and legs[name]["trainable"] > 0
    # A backend that is not installed is skipped, saying which package it needs.
    assert all("cannot run here" in r["skipped"] or "flex" in r["skipped"] for r in legs.values() if "skipped" in r)
    assert "s/step" in done.stdout
