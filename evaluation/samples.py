"""A PNG contact sheet of base and adapted samples, to glance at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vidtune.training.files import atomic_path


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, columns: int = 6) -> Path:
    """A PNG grid: one row per (label, video), `columns` frames evenly spaced across each video."""
    height, width = rows[0][1].shape[1:3]
    label_w = 160
    sheet = Image.new("RGB", (label_w + columns * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, video) in enumerate(rows):
        picks = np.linspace(0, len(video) - 1, num=min(columns, len(video))).round().astype(int)
        for column, frame in enumerate(picks):
            sheet.paste(Image.fromarray(video[frame]), (label_w + column * width, row * height))
        draw.text((4, row * height + 4), label[:26], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
