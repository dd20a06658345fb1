"""The LAION aesthetic predictor: a small head on the L2-normalised CLIP image embedding (about 1-10).

Two published head shapes, told apart by their state-dict keys: LAION-AI/aesthetic-predictor's `nn.Linear(dim, 1)`
(`weight`, `bias`) and christophschuhmann/improved-aesthetic-predictor's linear MLP (`layers.{0,2,4,6,7}.*`:
Linear layers with Dropout between them and no activation).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

MLP_LINEAR_INDICES = [0, 2, 4, 6, 7]  # improved-aesthetic-predictor's MLP: the Linear layers of its nn.Sequential

Layers = list[tuple[np.ndarray, np.ndarray]]  # (weight (out, in), bias (out,)) per Linear layer, applied in order


class AestheticHeadError(ValueError):
    """`scores.aesthetic_head` cannot be used; the message names the parameter and the fix."""


def aesthetic_scores(embeddings: np.ndarray, layers: Layers) -> np.ndarray:
    """One score per row of `embeddings` (n, dim), which are L2-normalised first as the heads were trained."""
    x = embeddings.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for weight, bias in layers:
        x = x @ weight.T + bias
    return x[:, 0]


def head_layers(state: dict) -> Layers:
    """The Linear layers of a published head's state dict, checked to chain from the embedding to one score."""
    if set(state) == {"weight", "bias"}:
        prefixes = [""]
    else:
        found = sorted({int(m[1]) for key in state if (m := re.fullmatch(r"layers\.(\d+)\.(?:weight|bias)", key))})
        if found != MLP_LINEAR_INDICES or len(state) != 2 * len(found):
            raise AestheticHeadError(
                "scores.aesthetic_head: not a LAION aesthetic head: expected the keys weight/bias (aesthetic-predictor) "
                f"or layers.{{0,2,4,6,7}}.weight/bias (improved-aesthetic-predictor, linearMSE), got {sorted(state)[:8]}"
            )
        prefixes = [f"layers.{i}." for i in found]
    layers = [(_array(state[f"{p}weight"]), _array(state[f"{p}bias"])) for p in prefixes]
    sizes = [w.shape for w, _ in layers]
    if any(a[0] != b[1] for a, b in zip(sizes, sizes[1:])) or sizes[-1][0] != 1:
        raise AestheticHeadError(f"scores.aesthetic_head: layer shapes {sizes} do not chain to one score")
    return layers


def _array(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class AestheticHead:
    """A head loaded from a local file or a URL (downloaded once into $VIDTUNE_HOME/models/aesthetic)."""

    def __init__(self, reference: str):
        self.reference = reference
        self.layers = head_layers(_read_state_dict(head_file(reference)))
        self.input_dim = self.layers[0][0].shape[1]

    def check_embedding_dim(self, dim: int, clip_model: str | None) -> None:
        if dim != self.input_dim:
            raise AestheticHeadError(
                f"scores.aesthetic_head: {self.reference} takes {self.input_dim}-dim CLIP embeddings, but "
                f"scores.clip_model {clip_model!r} makes {dim}-dim ones: use the head trained on that CLIP model "
                "(e.g. sa_0_4_vit_b_32_linear.pth for ViT-B-32, the l14 heads for ViT-L-14)"
            )

    def score(self, embeddings: np.ndarray, clip_model: str | None) -> list[float]:
        self.check_embedding_dim(embeddings.shape[1], clip_model)
        return [float(s) for s in aesthetic_scores(embeddings, self.layers)]


def head_file(reference: str) -> Path:
    """The local file of a head: `reference` itself, or the cached download of a URL."""
    if not reference.startswith(("https://", "http://")):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise AestheticHeadError(f"scores.aesthetic_head: no such file: {reference}")
        return path
    from torch.hub import download_url_to_file

    from vidtune.training.tracking import vidtune_home

    name = unquote(Path(urlparse(reference).path).name) or "head.pth"
    target = vidtune_home() / "models" / "aesthetic" / f"{hashlib.sha256(reference.encode()).hexdigest()[:12]}-{name}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(reference, str(target), progress=False)  # to a .partial file, then renamed
        except OSError as exc:
            raise AestheticHeadError(
                f"scores.aesthetic_head: cannot download {reference} ({exc}). Without network access, download it "
                "on a machine that has it and pass the local file: --set scores.aesthetic_head=PATH"
            ) from exc
    return target


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle that is more than tensors: both say the same to the user
        raise AestheticHeadError(f"scores.aesthetic_head: cannot read {path} as a state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise AestheticHeadError(f"scores.aesthetic_head: {path} holds a {type(state).__name__}, not a state dict")
    return state
