"""Scene boundaries and clip spans, computed while the source is decoded once.

Hard cuts come from PySceneDetect (ContentDetector by default, AdaptiveDetector selectable). PySceneDetect's
detectors look at consecutive frames, so slow fades and cross-dissolves slip through; two cheap per-frame
signals cover those: blank frames (near-constant luma: black, white, slates) and gradual transitions (colour
histograms that drift far apart over half a second while no single step is a cut). Frames they flag are
unusable, and clips are trimmed a few frames away from every boundary.

`detector="transnetv2"` replaces both PySceneDetect and the histogram check with a learned model that finds hard
cuts and fades/dissolves itself (`tasks/transnet.py`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scenedetect import AdaptiveDetector, ContentDetector
from scenedetect.common import FrameTimecode


class SceneParams(BaseModel):
    """How sources are split into shots and shots into clips."""

    model_config = ConfigDict(extra="forbid")

    detector: Literal["content", "adaptive", "transnetv2"] = Field(
        "content", description="Boundary detector: PySceneDetect's content/adaptive, or the TransNetV2 model."
    )
    threshold: float = Field(27.0, gt=0, description="ContentDetector threshold (higher = fewer cuts).")
    adaptive_threshold: float = Field(3.0, gt=0, description="AdaptiveDetector ratio threshold.")
    transnet_threshold: float = Field(
        0.5, gt=0, lt=1, description="TransNetV2 transition probability above which a frame is a cut or transition."
    )
    min_scene_s: float = Field(0.5, ge=0, description="Cuts closer together than this are merged (PySceneDetect).")
    min_clip_s: float = Field(1.0, gt=0, description="Shorter usable stretches are not made into clips.")
    max_clip_s: float = Field(5.0, gt=0, description="Longer shots are split into consecutive windows of this length.")
    trim_frames: int = Field(2, ge=0, description="Frames dropped on each side of a cut, fade or dissolve.")
    gradual_threshold: float = Field(
        0.35,
        ge=0,
        le=1,
        description="Histogram distance over `gradual_window_s` marking a fade/dissolve (0 = off; not with transnetv2).",
    )
    gradual_window_s: float = Field(0.5, gt=0, description="Window for gradual-transition detection.")
    blank_std: float = Field(4.0, ge=0, description="Frames whose luma std is below this are blank (0 = off).")
    detect_width: int = Field(256, ge=32, description="Width frames are downscaled to for detection.")

    @model_validator(mode="after")
    def _min_not_above_max(self) -> SceneParams:
        if self.min_clip_s > self.max_clip_s:
            raise ValueError(f"min_clip_s ({self.min_clip_s}) must not be greater than max_clip_s ({self.max_clip_s})")
        return self


# --------------------------------------------------------------------------------------------- pure signals


def luma_std(small_bgr: np.ndarray) -> float:
    luma = small_bgr[..., 0] * 0.114 + small_bgr[..., 1] * 0.587 + small_bgr[..., 2] * 0.299
    return float(luma.std())


def colour_histogram(small_bgr: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel histogram, normalised to sum 1 per channel (concatenated)."""
    quantised = (small_bgr.reshape(-1, 3) // (256 // bins)).astype(np.int64)
    counts = [np.bincount(quantised[:, c], minlength=bins) for c in range(3)]
    return np.concatenate(counts).astype(np.float32) / quantised.shape[0]


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance averaged over channels, in [0, 1]."""
    return float(np.abs(a - b).sum() / 6.0)


# --------------------------------------------------------------------------------------------- clip planning


@dataclass
class ClipPlanner:
    """Turns a stream of final per-frame statuses into clip spans [start, end) of source frame indices.

    Rules: a run is a stretch of usable frames with no cut inside; its ends are trimmed by `trim` frames where
    they touch a boundary (not at the start or end of the video); the trimmed run is cut greedily into windows
    of `max_len` frames and a last piece is kept if it has at least `min_len` frames. Windows are emitted as
    soon as no later boundary can change them, so callers only buffer frames of the open run.
    """

    min_len: int
    max_len: int
    trim: int
    frames_seen: int = 0
    _run_start: int | None = None  # first frame of the open run after trimming
    _emitted: list[tuple[int, int]] = field(default_factory=list)

    def push(self, usable: bool, cut_before: bool) -> list[tuple[int, int]]:
        i = self.frames_seen
        self.frames_seen += 1
        spans: list[tuple[int, int]] = []
        if self._run_start is not None and (cut_before or not usable):
            spans += self._close(end=i - self.trim)
        if usable and self._run_start is None:
            self._run_start = i if i == 0 else i + self.trim
        spans += self._ready_windows(limit=self.frames_seen - self.trim)
        return spans

    def finish(self) -> list[tuple[int, int]]:
        return self._close(end=self.frames_seen) if self._run_start is not None else []

    @property
    def earliest_needed(self) -> int:
        """Frames before this index will never be part of a future span."""
        return self.frames_seen if self._run_start is None else self._run_start

    def _ready_windows(self, limit: int) -> list[tuple[int, int]]:
        spans = []
        while self._run_start is not None and self._run_start + self.max_len <= limit:
            spans.append((self._run_start, self._run_start + self.max_len))
            self._run_start += self.max_len
        return spans

    def _close(self, end: int) -> list[tuple[int, int]]:
        spans = self._ready_windows(limit=end)
        start, self._run_start = self._run_start, None
        if start is not None and end - start >= self.min_len:
            spans.append((start, end))
        return spans


def plan_clip_spans(
    usable: list[bool], cuts: set[int], *, min_len: int, max_len: int, trim: int
) -> list[tuple[int, int]]:
    """Batch form of ClipPlanner: clip spans for a whole video from its per-frame usability and cut frames."""
    planner = ClipPlanner(min_len=min_len, max_len=max_len, trim=trim)
    spans = []
    for i, ok in enumerate(usable):
        spans += planner.push(ok, i in cuts)
    return spans + planner.finish()


# --------------------------------------------------------------------------------------------- detection


def make_cut_detector(params: SceneParams, fps: float):
    min_scene_len = max(1, round(params.min_scene_s * fps))  # frames: scenedetect's int form is exact
    if params.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=params.adaptive_threshold, min_scene_len=min_scene_len)
    return ContentDetector(threshold=params.threshold, min_scene_len=min_scene_len)


@dataclass
class _FrameState:
    usable: bool = True
    cut_before: bool = False


class BoundaryDetector:
    """Feeds downscaled frames to the cut detector and the blank/gradual checks; releases final statuses.

    A frame's status is final once it is `lag` frames old: later frames can still flag it (scenedetect emits
    cuts up to min_scene_len frames late, and a gradual transition is only seen at its end).
    """

    def __init__(self, params: SceneParams, fps: float):
        self.params = params
        self.fps = fps
        self.window = max(2, round(params.gradual_window_s * fps))
        self.transnet = None
        if params.detector == "transnetv2":
            from vidtune.tasks import transnet  # torch and the model are loaded only when asked for
            from vidtune.tasks.scoring import resolve_device

            self.transnet = transnet.TransNetDetector(params.transnet_threshold, resolve_device("auto"))
            self.lag = transnet.LAG
            # The model finds fades and dissolves itself, so the histogram check is off; blank frames are no
            # transition to it but are still unusable, so blank_std applies (it also covers a fade's black middle).
            self.check_gradual = False
        else:
            self.cut_detector = make_cut_detector(params, fps)
            self.lag = round(params.min_scene_s * fps) + self.window + 4  # +4: adaptive window and a margin
            self.check_gradual = params.gradual_threshold > 0
        self._pending: deque[_FrameState] = deque()
        self._first_pending = 0  # frame index of _pending[0]
        self._hists: deque[np.ndarray] = deque(maxlen=self.window + 1)
        self._steps: deque[float] = deque(maxlen=self.window)
        self.frames_seen = 0
        self.cuts: list[int] = []
        self.gradual: list[tuple[int, int]] = []

    def push(self, small_bgr: np.ndarray, *, usable: bool = True, cut_before: bool = False) -> list[_FrameState]:
        """Add frame `frames_seen`. `usable=False`/`cut_before=True` let the caller flag decoder trouble."""
        i = self.frames_seen
        self.frames_seen += 1
        state = _FrameState(usable=usable, cut_before=cut_before and i > 0)
        self._pending.append(state)
        sparse = small_bgr[::2, ::2]  # every 4th pixel: the same statistics at a quarter of the cost
        if self.params.blank_std > 0 and luma_std(sparse) < self.params.blank_std:
            state.usable = False
        if self.transnet is not None:
            self._mark(*self.transnet.push(small_bgr))
        else:
            for timecode in self.cut_detector.process_frame(FrameTimecode(i, self.fps), small_bgr):
                self._mark_cut(int(timecode.frame_num))
        if self.check_gradual:
            self._check_gradual(i, colour_histogram(sparse))
        return self._release(keep=self.lag)

    def finish(self) -> list[_FrameState]:
        if self.transnet is not None:
            self._mark(*self.transnet.finish())
        return self._release(keep=0)

    def _mark(self, cuts: list[int], gradual: list[int]) -> None:
        for frame in cuts:
            self._mark_cut(frame)
        for frame in gradual:
            self._mark_gradual(frame)

    def _mark_cut(self, frame: int) -> None:
        if frame > 0 and frame >= self._first_pending:
            self._pending[frame - self._first_pending].cut_before = True
            self.cuts.append(frame)

    def _check_gradual(self, i: int, hist: np.ndarray) -> None:
        if self._hists:
            self._steps.append(histogram_distance(hist, self._hists[-1]))
        self._hists.append(hist)
        if len(self._hists) <= self.window:
            return
        reference = self._hists[0]
        drift = histogram_distance(hist, reference)
        # A hard cut also drifts far over the window, but in one step; a fade/dissolve spreads it out.
        if drift <= self.params.gradual_threshold or max(self._steps) >= 0.5 * drift:
            return
        # Frames in the transition look like neither end of the window; the clean frames on either side
        # match one end and stay usable (the trim then keeps clips a few frames away).
        margin = 0.15 * drift
        first = i - self.window
        for k, h in enumerate(self._hists):
            if histogram_distance(h, reference) > margin and histogram_distance(h, hist) > margin:
                self._mark_gradual(first + k)

    def _mark_gradual(self, frame: int) -> None:
        """Frame `frame` is part of a fade/dissolve: unusable, and added to (or extending) the reported spans."""
        if frame >= self._first_pending:
            self._pending[frame - self._first_pending].usable = False
        if self.gradual and self.gradual[-1][1] >= frame - 1:
            self.gradual[-1] = (self.gradual[-1][0], max(frame, self.gradual[-1][1]))
        else:
            self.gradual.append((frame, frame))

    def _release(self, keep: int) -> list[_FrameState]:
        released = []
        while len(self._pending) > keep:
            released.append(self._pending.popleft())
            self._first_pending += 1
        return released
