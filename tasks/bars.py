"""Letterbox, pillarbox and windowbox bars: the active picture of a shot, found from its luma planes.

Like FFmpeg's cropdetect, a line (row or column) is picture when enough of its pixels are brighter than black by
more than a threshold in some frame of the shot; the bars are the dark lines around the outermost picture lines.
Two things cropdetect does not do keep dark scenes and fades from passing for bars:
- every sampled frame of the shot votes (a pixel bright in any frame is picture), so a fade-in or a dark frame
  cannot shrink the box;
- a bar must end at a hard edge: the first picture line inside it is mostly bright in some frame, as the edge of
  real picture is. A dark scene fades towards its border (vignettes, night skies, a lamp in a dark room): no hard
  edge, so no bar, and the frame is kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LINE_FRACTION = 0.02  # a line with fewer bright pixels is dark (noise, compression ringing next to the picture)
EDGE_SEARCH = 0.02  # how far (fraction of the side, at least 3 lines) inside the first bright line the edge may be
EDGE_RATIO = 0.5  # at the edge, a line is at least this bright (above black) relative to the picture's median line


@dataclass(frozen=True)
class Crop:
    """A rectangle of a frame in pixels (left, top, width, height)."""

    left: int
    top: int
    width: int
    height: int

    @classmethod
    def full(cls, width: int, height: int) -> Crop:
        return cls(0, 0, width, height)

    def is_full(self, width: int, height: int) -> bool:
        return self == Crop.full(width, height)

    def scaled(self, factor_x: float, factor_y: float) -> Crop:
        """The same rectangle on a frame resized by (factor_x, factor_y), rounded inwards."""
        left, top = int(np.ceil(self.left * factor_x - 1e-6)), int(np.ceil(self.top * factor_y - 1e-6))
        right = int(np.floor((self.left + self.width) * factor_x + 1e-6))
        bottom = int(np.floor((self.top + self.height) * factor_y + 1e-6))
        return Crop(left, top, right - left, bottom - top)

    def even(self) -> Crop:
        """Rounded inwards to even coordinates and sizes (4:2:0 chroma stays aligned)."""
        left, top = self.left + self.left % 2, self.top + self.top % 2
        right, bottom = self.left + self.width, self.top + self.height
        right, bottom = right - right % 2, bottom - bottom % 2
        return Crop(left, top, max(2, right - left), max(2, bottom - top))


def black_level(color_range: int) -> int:
    """Luma code of black: 0 in full ("JPEG") range, 16 in limited range (FFmpeg's AVCOL_RANGE_JPEG is 2)."""
    return 0 if color_range == 2 else 16


def detect_active_area(lumas: Sequence[np.ndarray], black: int, threshold: int) -> Crop:
    """The picture inside dark bars of one shot's luma planes (same size, uint8); the whole frame when there are
    no bars, or when the frames are too dark to tell."""
    height, width = lumas[0].shape
    bright = np.zeros((height, width), bool)
    row_level, col_level = np.zeros(height), np.zeros(width)  # each line's mean luma in its brightest frame
    for luma in lumas:
        bright |= luma > black + threshold
        np.maximum(row_level, luma.mean(axis=1), out=row_level)
        np.maximum(col_level, luma.mean(axis=0), out=col_level)
    rows, cols = bright.mean(axis=1), bright.mean(axis=0)
    if not (rows >= LINE_FRACTION).any():
        return Crop.full(width, height)  # nothing but dark frames: no evidence of bars
    top, bottom = _picture_span(rows, row_level - black)
    left, right = _picture_span(cols, col_level - black)
    return Crop(left, top, right - left, bottom - top)


def _picture_span(bright_fraction: np.ndarray, level: np.ndarray) -> tuple[int, int]:
    """[start, end) of the picture along one axis, from each line's fraction of bright pixels and its level above
    black; (0, size) unless both ends are hard edges."""
    size = len(level)
    picture = np.flatnonzero(bright_fraction >= LINE_FRACTION)
    first, last = int(picture[0]), int(picture[-1])
    edge_level = EDGE_RATIO * float(np.median(level[first : last + 1]))
    search = max(3, round(EDGE_SEARCH * size))
    start = _hard_edge(level, first, search, edge_level)
    end = _hard_edge(level[::-1], size - 1 - last, search, edge_level)
    if start is None or end is None or start >= size - end:
        return 0, size
    return start, size - end


def _hard_edge(level: np.ndarray, first: int, search: int, edge_level: float) -> int | None:
    """Where the bar before line `first` ends: the first line within `search` lines that is as bright as picture
    (0 when there is no bar; None when the picture fades in from black instead of starting at an edge)."""
    if first == 0:
        return 0
    return next((i for i in range(first, min(len(level), first + search)) if level[i] >= edge_level), None)
