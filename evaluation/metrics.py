"""Sample metrics as pure functions of arrays (CONTRIBUTING.md, Style 2): callers embed frames and read files.

- clip_alignment: mean per-frame cosine between CLIP image embeddings and the prompt's text embedding.
- frame_consistency: mean cosine between CLIP image embeddings of consecutive frames (1 = no change).
- temporal_flicker: mean absolute difference of consecutive frames in grey levels 0-255 (VBench's temporal
  flickering measure before its rescaling; lower = steadier).
- first_frame_psnr: PSNR in dB of an image-to-video sample's first frame against its conditioning image (resized
  to the sample's size); higher = the video starts closer to the given frame. Image-to-video runs only.
- first_frame_clip: cosine between the CLIP image embeddings of an image-to-video sample's first frame and of its
  conditioning image; higher = closer in content (where PSNR also counts small shifts and noise). Needs the CLIP model.
- frechet_distance: the Fréchet distance between Gaussians fitted to two feature sets (FVD on I3D features).
"""

from __future__ import annotations

import numpy as np

METRICS = ("val_loss", "clip_alignment", "frame_consistency", "temporal_flicker", "motion", "fvd")
IMAGE_METRICS = ("first_frame_psnr", "first_frame_clip")  # measured, and reported, for image-to-video runs only
LOWER_IS_BETTER = {"val_loss", "temporal_flicker", "fvd"}
HIGHER_IS_BETTER = {"clip_alignment", "frame_consistency", "first_frame_psnr", "first_frame_clip"}
PSNR_CAP = 100.0  # dB reported for identical frames (PSNR is infinite there)


def clip_alignment(frame_embeddings: np.ndarray, text_embedding: np.ndarray) -> float:
    """Both L2-normalised: (frames, dim) and (dim,)."""
    return float((frame_embeddings @ text_embedding).mean())


def frame_consistency(frame_embeddings: np.ndarray) -> float:
    if len(frame_embeddings) < 2:
        return 1.0
    return float((frame_embeddings[1:] * frame_embeddings[:-1]).sum(axis=1).mean())


def temporal_flicker(frames: np.ndarray) -> float:
    """uint8 (frames, h, w, 3)."""
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.float32), axis=0)).mean())


def first_frame_psnr(frames: np.ndarray, image: np.ndarray) -> float:
    """uint8 (frames, h, w, 3) and the conditioning image as uint8 (h, w, 3), the same size."""
    error = np.mean((frames[0].astype(np.float64) - image.astype(np.float64)) ** 2)
    return float(min(PSNR_CAP, 10 * np.log10(255.0**2 / error))) if error > 0 else PSNR_CAP


def first_frame_clip(frame_embeddings: np.ndarray, image_embedding: np.ndarray) -> float:
    """Both L2-normalised: the sample's frames (frames, dim) and its conditioning image's (dim,)."""
    return float(frame_embeddings[0] @ image_embedding)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for feature sets (n, dim), via the eigenvalues of
    S_a^1/2 S_b S_a^1/2 (symmetric, so no complex square roots)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    )


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
