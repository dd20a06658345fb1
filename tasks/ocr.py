"""Text overlays (subtitles, logos, burnt-in captions): the share of a frame that PP-OCR's text detector marks
as text. Only detection runs (rapidocr_onnxruntime's ONNX model, shipped in its wheel), no recognition."""

from __future__ import annotations

import threading

import numpy as np

DETECT_SIDE = 640  # frames are downscaled to this long side for detection: subtitles stay >10 px tall


def text_area(boxes: list[np.ndarray], height: int, width: int) -> float:
    """Fraction of a height x width frame covered by the union of text polygons (N x 2 points, x then y)."""
    import cv2

    mask = np.zeros((height, width), np.uint8)
    for box in boxes:  # one call per box: a single fillPoly call leaves overlaps of its polygons unfilled
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)  # clipped to the frame
    return float(mask.mean())


class TextAreaScorer:
    """The detection stage of PP-OCRv4 (one ONNX Runtime session per process, through `cached_model`)."""

    def __init__(self):
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import read_yaml, update_model_path

        config = update_model_path(read_yaml(DEFAULT_CFG_PATH))["Det"]
        # "max": never upscale (the packaged "min" 736 upscales small frames, ~3x the time for nothing)
        self.detector = TextDetector({**config, "limit_type": "max"})
        self.lock = threading.Lock()  # TextDetector keeps per-call state on itself: one call at a time

    def score(self, frames: np.ndarray) -> float:
        """The largest text area, in percent of the frame, over uint8 RGB `frames` (frames, H, W, 3)."""
        import cv2

        areas = [0.0]
        for frame in frames:
            h, w = frame.shape[:2]
            scale = min(1.0, DETECT_SIDE / max(h, w))
            small = cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            with self.lock:
                boxes, _ = self.detector(np.ascontiguousarray(small[..., ::-1]))  # PaddleOCR models read BGR
            if boxes is not None and len(boxes):
                areas.append(text_area(list(boxes), *small.shape[:2]))
        return 100 * max(areas)
