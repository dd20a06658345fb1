"""Latent cache bytes per clip, before and after the cache kept only real prompt tokens (and Wan only the mean).

Per family, at its published size: the latent shape comes from encoding a clip with the family's tiny VAE (the
published compression, fewer channels) with the published latent channel count; the prompt length comes from the
published tokenizer and the family's own prompt encoding (`vidtune.training.cache._text_tensors`, which cuts the
padding) on three captions of typical captioner lengths; the text width from the published text encoder config.
Bytes are bf16 (precompute on a GPU). "before": moments (mean and log-variance) and the prompt padded to the
family's length; "after": what the cache writes now. MiB = 2^20 bytes.

    .venv/bin/python bench/cache_size.py [--frames 81 --height 480 --width 832] [--models wan ltx-video ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vidtune.training.cache import _text_tensors  # noqa: E402
from vidtune.training.published_configs import published_config  # noqa: E402
from vidtune.training.tiny_models import TINY_MODELS, build_tiny, tiny_spec  # noqa: E402

CAPTIONS = {  # lengths a captioner writes: a tag line, a sentence or two, a detailed paragraph
    "short": "a red car drives along a coastal road at sunset",
    "medium": (
        "A red vintage convertible drives along a winding coastal road at sunset. The camera follows from behind as "
        "the car passes low stone walls, with the sea on the left and warm light on the hills."
    ),
    "long": (
        "A red vintage convertible with chrome trim drives along a winding coastal road at sunset, seen from a "
        "tracking shot behind and slightly above it. The driver wears a white scarf that moves in the wind. Low "
        "stone walls line the road, the sea stretches to the horizon on the left, and golden light falls across "
        "dry grass on the hills to the right. Small waves break on rocks below. The road curves gently, the car "
        "slows into the bend, and the shadows of roadside cypress trees pass over it. The colours are warm and "
        "saturated, with soft film grain and a shallow depth of field."
    ),
}
MODELS = ["wan", "ltx-video", "hunyuan-video", "cogvideox"]
MIB = 2**20


def _width(config: dict) -> int:
    return config.get("d_model") or config["hidden_size"]


def _latent_channels(config: dict) -> int:
    return config.get("z_dim") or config["latent_channels"]


def clip_bytes(name: str, frames: int, height: int, width: int) -> dict:
    family, spec = TINY_MODELS[name], tiny_spec(name)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = family.load_pipeline(str(build_tiny(name, Path(tmp) / "model")))
    # The published compression, from the tiny VAE (it keeps the published down-sampling); a small clip suffices.
    probe = family.encode_video(pipe, torch.zeros(1, 3, 9, 64, 64))
    t_factor, s_factor = 8 / (probe.shape[2] - 1), 64 / probe.shape[3]
    latent_frames = int((frames - 1) / t_factor) + 1
    vae, text = (
        published_config(spec.parts[p].repo, f"{spec.parts[p].path}/config.json") for p in ("vae", "text_encoder")
    )
    latent = _latent_channels(vae) * latent_frames * int(height / s_factor) * int(width / s_factor) * 2
    stored = {k: _text_tensors(family.encode_prompts(pipe, [c])) for k, c in CAPTIONS.items()}
    tokens = {k: int(tensors["embeds"].shape[0]) for k, tensors in stored.items()}
    padded = int(stored["short"]["tokens"])
    per_token = _width(text) * 2
    before = 2 * latent + padded * per_token
    after = {k: (2 if family.caches_posterior else 1) * latent + n * per_token for k, n in tokens.items()}
    return {
        "model": name,
        "latent_bytes_mean": latent,
        "caches_posterior": family.caches_posterior,
        "prompt_tokens": tokens,
        "padded_tokens": padded,
        "before_bytes": before,
        "after_bytes": after,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(TINY_MODELS))
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)
    rows = [clip_bytes(m, args.frames, args.height, args.width) for m in args.models]
    print(f"latent cache per clip at {args.frames} x {args.height} x {args.width}, bf16 (MiB)")
    print(
        f"  {'model':15s} {'before':>8s} {'after: short':>13s} {'medium':>8s} {'long':>8s}   tokens (of padded)  latents"
    )
    for r in rows:
        after = r["after_bytes"]
        tokens = "/".join(str(n) for n in r["prompt_tokens"].values())
        kept = "moments" if r["caches_posterior"] else "mean"
        print(
            f"  {r['model']:15s} {r['before_bytes'] / MIB:8.2f} {after['short'] / MIB:13.2f} "
            f"{after['medium'] / MIB:8.2f} {after['long'] / MIB:8.2f}   {tokens:>10s} ({r['padded_tokens']})    {kept}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
