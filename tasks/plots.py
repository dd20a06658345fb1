"""Histograms of clip scores with the filter thresholds drawn in, written next to the manifest."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from vidtune.tasks.files import atomic_path
from vidtune.tasks.filters import FilterParams
from vidtune.tasks.records import ClipRecord, Status

SCORES = {
    "clip_score": ("CLIP text-video score (cosine)", ("min_clip_score",)),
    "motion_score": ("motion (% of frame width per second)", ("min_motion", "max_motion")),
    "text_area": ("text overlay (% of the frame)", ("max_text_area",)),
    "aesthetic_score": ("LAION aesthetic score", ("min_aesthetic",)),
}


def write_score_histograms(rows: list[ClipRecord], filters: FilterParams, folder: Path) -> list[Path]:
    written = []
    for field, (label, thresholds) in SCORES.items():
        scored = [r for r in rows if r.clip_id and getattr(r, field) is not None]
        if not scored:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        kept = [getattr(r, field) for r in scored if r.status == Status.KEPT]
        dropped = [getattr(r, field) for r in scored if r.status != Status.KEPT]
        ax.hist(
            [kept, dropped],
            bins=30,
            stacked=True,
            label=[f"kept ({len(kept)})", f"not kept ({len(dropped)})"],
            color=["#3b82f6", "#d1d5db"],
        )
        for name in thresholds:
            value = getattr(filters, name)
            if value is not None:
                ax.axvline(value, color="#dc2626", linestyle="--", label=f"filters.{name} = {value}")
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{field}_hist.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(path)
    return written
