"""The LAION aesthetic score: both published head shapes (random weights, the tiny CLIP's embedding size) on the
saved CLIP embedding, the filter, a head for another CLIP model, and heads given as URLs."""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
import torch
from torch import nn

from vidtune.tasks.aesthetic import AestheticHead, AestheticHeadError, head_file
from vidtune.tasks.annotate import Annotators, annotate_clips, embedding_path
from vidtune.tasks.captions import CaptionParams
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.scoring import SampledFrames, ScoreParams
from vidtune.training.tiny_models import TINY_CLIP

TINY_DIM = 32  # vidtune-tiny-clip's embed_dim


def linear_head(dim: int) -> nn.Module:
    """LAION-AI/aesthetic-predictor's head (sa_0_4_vit_*_linear.pth)."""
    return nn.Linear(dim, 1)


def mlp_head(dim: int) -> nn.Module:
    """christophschuhmann/improved-aesthetic-predictor's MLP (sac+logos+ava1-l14-linearMSE.pth), keys layers.N.*."""
    module = nn.Module()
    module.layers = nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    module.forward = module.layers.forward
    return module


def _save(build, dim: int, path) -> str:
    """Random weights of the published shape, scaled so that the tiny CLIP's similar embeddings score apart."""
    torch.manual_seed(0)
    head = build(dim)
    for layer in (m for m in head.modules() if isinstance(m, nn.Linear)):
        nn.init.normal_(layer.weight, std=3 / layer.in_features**0.5)
    torch.save(head.state_dict(), path)
    return str(path)


def _scores(tiny_clip, head: str, **extra) -> ScoreParams:
    return ScoreParams(
        clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), aesthetic_head=head, motion=False, device="cpu", **extra
    )


@pytest.mark.parametrize("build", [linear_head, mlp_head])
def test_the_score_is_the_head_on_the_normalised_saved_embedding(tiny_clip, tmp_path, build):
    head = _save(build, TINY_DIM, tmp_path / "head.pth")
    rng = np.random.default_rng(0)
    rows = [ClipRecord(clip_id=f"c{i}", source="s.mp4", source_sha256="x", fps=8, end_s=1) for i in range(3)]
    frames = {r.clip_id: rng.integers(0, 255, (2, 48, 48, 3), dtype=np.uint8) for r in rows}
    sampled = {k: SampledFrames(clip=f, motion=f, motion_dt=0.5) for k, f in frames.items()}
    annotate_clips(rows, tmp_path, None, CaptionParams(trigger="t"), _scores(tiny_clip, head), sampled)

    expected_head = build(TINY_DIM).eval()
    expected_head.load_state_dict(torch.load(head))
    saved = torch.from_numpy(np.stack([np.load(embedding_path(tmp_path, r.clip_id)) for r in rows])).float()
    with torch.no_grad():
        expected = expected_head(nn.functional.normalize(saved, dim=-1))[:, 0].tolist()
    assert [r.aesthetic_score for r in rows] == pytest.approx(expected, abs=1e-4)
    assert len(set(expected)) == 3

    lowest, second = sorted(expected)[:2]
    threshold = round((lowest + second) / 2, 4)  # drops exactly the lowest
    out = apply_filters(rows, FilterParams(min_aesthetic=threshold, min_motion=None))
    low = min(out, key=lambda r: r.aesthetic_score)
    assert low.status == Status.FILTERED
    assert low.reason == f"low aesthetic score: {low.aesthetic_score:.2f} < filters.min_aesthetic {threshold:g}"
    assert [r.status for r in out].count(Status.KEPT) == 2


def test_embeddings_are_l2_normalised_before_the_head(tmp_path):
    head = linear_head(TINY_DIM)
    head.load_state_dict(torch.load(_save(linear_head, TINY_DIM, tmp_path / "head.pth")))
    embeddings = np.random.default_rng(0).normal(size=(4, TINY_DIM)).astype(np.float32) * 3  # not unit length
    with torch.no_grad():
        expected = head(nn.functional.normalize(torch.from_numpy(embeddings), dim=-1))[:, 0].numpy()
    measured = AestheticHead(str(tmp_path / "head.pth")).score(embeddings, TINY_CLIP)
    assert measured == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_head_for_another_clip_model_is_refused_naming_both(tiny_clip, tmp_path):
    head = _save(linear_head, 768, tmp_path / "sa_0_4_vit_l_14_linear.pth")  # ViT-L-14's size
    with pytest.raises(AestheticHeadError, match=r"scores\.aesthetic_head: .* 768-dim .* scores\.clip_model "):
        Annotators.load(CaptionParams(), _scores(tiny_clip, head))


def test_a_file_that_is_not_an_aesthetic_head_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)).state_dict(), path)
    with pytest.raises(AestheticHeadError, match=r"scores\.aesthetic_head: not a LAION aesthetic head"):
        AestheticHead(str(path))
    with pytest.raises(AestheticHeadError, match=r"scores\.aesthetic_head: no such file"):
        AestheticHead(str(tmp_path / "missing.pth"))


def test_the_aesthetic_score_needs_clip():
    with pytest.raises(ValueError, match="aesthetic_head scores the CLIP embedding"):
        ScoreParams(clip=False, aesthetic_head="head.pth")


def test_a_url_is_downloaded_once_and_without_network_the_error_says_what_to_do(tmp_path):
    _save(linear_head, TINY_DIM, tmp_path / "sa_0_4_vit_b_32_linear.pth")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/sa_0_4_vit_b_32_linear.pth"
    try:
        first = head_file(url)
    finally:
        server.shutdown()
        server.server_close()
    assert first.read_bytes() == (tmp_path / "sa_0_4_vit_b_32_linear.pth").read_bytes()
    assert head_file(url) == first and AestheticHead(url).input_dim == TINY_DIM  # the server is gone: cached
    with pytest.raises(
        AestheticHeadError, match=r"cannot download .* pass the local file: --set scores\.aesthetic_head"
    ):
        head_file(f"http://127.0.0.1:{server.server_port}/other.pth")
