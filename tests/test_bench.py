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
    ran = {"1.3b-ckpt", "1.3b-no-ckpt", "1.3b-fp8-cast", "1.3b-fp8-scaled", "14b-swap-24gb", "14b-fp8-swap-24gb-49f"}
    assert ran <= set(legs) and not [r for r in legs.values() if "error" in r]
    for name in ran:
        assert math.isfinite(legs[name]["loss"]) and legs[name]["s_per_step"] > 0 and legs[name]["trainable"] > 0
        assert legs[name]["plan_gib"] > 0  # the memory plan's estimate at the published size, printed beside the peak
    # blocks_to_swap=auto, resolved by the memory plan under the 24 GiB cap: some blocks swap, not all 40.
    assert 0 < legs["14b-fp8-swap-24gb-49f"]["blocks_to_swap"] < 40
    # A backend that is not installed is skipped, saying which package it needs.
    assert all("cannot run here" in r["skipped"] or "flex" in r["skipped"] for r in legs.values() if "skipped" in r)
    assert "s/step" in done.stdout
    # Block swap against the resident model (on a GPU with both streams delayed): the same loss and gradients.
    assert legs["1.3b-swap-equal"]["agree"] and legs["1.3b-swap-equal"]["grad_relative_error"] == 0.0


def test_the_cache_size_bench_reports_wan_clips_under_half_their_former_bytes(tmp_path):
    """`bench/cache_size.py`: at 81 x 480 x 832 a Wan clip was ~12 MiB (moments and a 512-token prompt); the mean and
    the prompt's real tokens are under half that."""
    out = tmp_path / "sizes.json"
    bench = BENCH.with_name("cache_size.py")
    done = subprocess.run(
        [sys.executable, str(bench), "--models", "wan", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wan,) = json.loads(out.read_text())
    assert wan["latent_bytes_mean"] == 16 * 21 * 60 * 104 * 2  # 16 channels, 81 frames / 4 + 1, 480 x 832 / 8, bf16
    assert wan["before_bytes"] == 2 * wan["latent_bytes_mean"] + 512 * 4096 * 2  # ~12 MiB
    assert wan["prompt_tokens"]["short"] < wan["prompt_tokens"]["long"] < 512
    assert all(after < wan["before_bytes"] / 2 for after in wan["after_bytes"].values())
