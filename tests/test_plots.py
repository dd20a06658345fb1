"""Score histograms: one per score the rows have, none for a score that was not computed."""

from __future__ import annotations

from vidtune.tasks.filters import FilterParams
from vidtune.tasks.plots import write_score_histograms
from vidtune.tasks.records import ClipRecord, Status


def test_a_histogram_per_computed_score(tmp_path):
    rows = [
        ClipRecord(clip_id=f"c{i}", source="s.mp4", source_sha256="x", text_area=i * 2.0, aesthetic_score=4 + i / 3)
        for i in range(6)
    ]
    rows[0].status = Status.FILTERED
    written = write_score_histograms(rows, FilterParams(max_text_area=5, min_aesthetic=4.5), tmp_path)
    assert sorted(p.name for p in written) == ["aesthetic_score_hist.png", "text_area_hist.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
