"""Tiny diffusers models: built from config, saved, and loaded through the path users take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vidtune.flows.cli import app
from vidtune.training.published_configs import build_from_config, published_config
from vidtune.training.tiny_models import TINY_MODELS, build_tiny, tiny_spec


def test_tiny_wan_loads_with_from_pretrained_and_generates(tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    result = CliRunner().invoke(app, ["tiny-model", "wan", str(tmp_path / "wan")])
    assert result.exit_code == 0, result.output
    for part in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "wan" / part).exists()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "wan")
    assert isinstance(pipe, WanPipeline)
    video = pipe(
        prompt="a red car in sks style",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()


def test_unknown_family_lists_the_supported_ones(tmp_path):
    result = CliRunner().invoke(app, ["tiny-model", "sora", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert (
        result.exit_code == 2
        and "unknown tiny model 'sora'; available: animatediff, animatediff-sdxl, cogvideox, hunyuan-video, ltx-video, ltx-video-i2v, wan, wan-14b, wan-i2v, wan2.2-i2v-a14b, wan2.2-t2v-a14b, wan2.2-ti2v-5b"
        in result.output
    )


IGNORED = {
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "vocab_size",
}  # metadata; vocab: our tokenizer's


def _saved_config(folder: Path, component: str) -> dict:
    """A saved component's full config as its library reads it back (transformers stores only non-defaults)."""
    if component == "scheduler":
        return json.loads((folder / component / "scheduler_config.json").read_text())
    config = json.loads((folder / component / "config.json").read_text())
    if "_class_name" in config:
        return config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder / component).to_dict()


def _as_loaded(config: dict) -> dict:
    """A transformers config as its model class holds it (encoder-only T5 classes reset decoder settings), built
    on the meta device: a full-size published model without allocating it."""
    if "_class_name" in config or "architectures" not in config:
        return config
    with torch.device("meta"):
        return build_from_config(config).config.to_dict()


def _as_2d(value):
    """AnimateDiff pipelines turn an SD UNet's blocks into motion blocks (CrossAttnDownBlock2D -> ...Motion)."""
    return (
        [v.replace("Motion", "2D") for v in value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value)
        else value
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_are_the_published_configs_with_only_sizes_shrunk(name, tmp_path):
    from transformers import AutoTokenizer

    spec = tiny_spec(name)
    folder = build_tiny(name, tmp_path / name)
    for component, part in spec.parts.items():
        file = "scheduler_config.json" if component == "scheduler" else "config.json"
        published, saved = (
            _as_loaded(published_config(part.repo, f"{part.path}/{file}")),
            _saved_config(folder, component),
        )
        changed = {
            key
            for key, value in published.items()
            if not key.startswith("_")
            and key not in IGNORED
            and key in saved
            and value is not None
            and _as_2d(saved[key]) != value
        }
        if component.startswith(
            "text_encoder"
        ):  # special-token ids may change only to the same tokens in our vocabulary
            tokenizer = AutoTokenizer.from_pretrained(folder / component.replace("text_encoder", "tokenizer"))
            moved = {key for key in changed if key.endswith("_token_id")}
            assert all(published[key] >= len(tokenizer) and saved[key] == getattr(tokenizer, key) for key in moved), (
                component,
                moved,
            )
            changed -= moved
        assert changed <= set(part.shrink), (
            f"{name} {component}: changed beyond size fields: {sorted(changed - set(part.shrink))}"
        )
        assert changed or component == "scheduler", f"{name} {component}: nothing was shrunk"
    for component, part in spec.tokenizers.items():
        tokenizer, published = (
            AutoTokenizer.from_pretrained(folder / component),
            published_config(part.repo, f"{part.path}/tokenizer_config.json"),
        )
        expected = (
            published.get("model_max_length") if published.get("model_max_length", 1e30) < 1e6 else spec.max_length
        )
        assert tokenizer.model_max_length == expected
        shipped = published_config(part.repo, f"{part.path}/special_tokens_map.json")
        for role in ("pad_token", "eos_token"):
            token = shipped[role]["content"] if isinstance(shipped[role], dict) else shipped[role]
            assert getattr(tokenizer, role) == token, (component, role)


def test_the_wan_14b_configs_differ_from_the_1_3b_only_in_size():
    big, small = (
        published_config(repo, "transformer/config.json")
        for repo in ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    )
    assert {k for k in big if big[k] != small.get(k)} <= {
        "num_attention_heads",
        "num_layers",
        "ffn_dim",
        "_name_or_path",
    }
    assert big["num_layers"] == 40 and big["num_attention_heads"] * big["attention_head_dim"] == 5120


def test_stored_diffusers_configs_have_only_init_keys_besides_the_retired_ones():
    """A key the installed diffusers does not take is ignored with a warning; only the published `clip_output` of
    the Wan 2.2 VAEs (removed from diffusers later) may be, and building drops it."""
    import inspect

    import diffusers

    from vidtune.training.published_configs import CONFIG_ROOT, RETIRED_KEYS

    unknown = {}
    for file in sorted(CONFIG_ROOT.glob("*/*/**/config.json")):
        config = json.loads(file.read_text())
        if "_class_name" in config and hasattr(diffusers, config["_class_name"]):
            accepted = inspect.signature(getattr(diffusers, config["_class_name"]).__init__).parameters
            extra = {k for k in config if not k.startswith("_") and k not in accepted} - RETIRED_KEYS
            if extra:
                unknown[str(file.relative_to(CONFIG_ROOT))] = extra
    assert not unknown
    vae = published_config("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae/config.json")
    with torch.device("meta"):  # full size, no memory
        built = build_from_config(vae)
    assert "clip_output" in vae and "clip_output" not in built.config
