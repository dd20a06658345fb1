"""Our ComfyUI LoRA file, read the ways other tools read it, for every family ComfyUI loads.

ComfyUI itself is not on the package index, so its reading is re-done here from its source (cited per step):
comfy/lora.py maps `diffusion_model.<name>` to the model weight `<name>` (the original release's module names; for
HunyuanVideo the original Tencent names through its diffusion-pipe alias), and comfy/weight_adapter/lora.py merges
`W += (alpha / rank if alpha else 1) * lora_B @ lora_A`. Which diffusers module an original name is, and how a fused
original weight splits, is diffusers' own single-file converter; what diffusers' LoRA loader makes of the file is its
`load_lora_weights` (its non-diffusers converters)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests.test_families import _video
from vidtune.training.adapters import comfyui_export, export_comfyui, lora_modules_of
from vidtune.training.families import get_family
from vidtune.training.tiny_models import build_tiny

COMFYUI_FAMILIES = ["wan", "wan-i2v", "ltx-video", "hunyuan-video"]  # wan-i2v: Wan 2.1 I2V's image branch too


@pytest.fixture(scope="module", params=COMFYUI_FAMILIES)
def comfy_family(request, tmp_path_factory):
    family = get_family(request.param)
    folder = build_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    pipe = family.load_pipeline(str(folder))
    torch.manual_seed(0)
    latents = family.sample_latents(pipe, family.encode_video(pipe, _video()), torch.Generator().manual_seed(0))
    batch = family.objective(pipe).inputs(latents, torch.Generator().manual_seed(1))
    batch = replace(batch, condition=family.encode_condition(pipe, _video()))  # wan-i2v: first-frame conditioning
    return family, folder, pipe, batch, family.encode_prompts(pipe, ["a red car in sks style"])


def _fresh_denoiser(family, folder):
    return type(getattr(family.load_pipeline(str(folder)), family.denoiser_name)).from_pretrained(
        folder, subfolder=family.denoiser_name
    )


def _with_random_lora(denoiser, targets, seed=0):
    """A LoRA (rank 4, alpha 8: scale 2) on `targets` with random lora_B, so every module changes the output."""
    from peft import LoraConfig

    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return denoiser


def _predict(family, pipe, batch, text, denoiser):
    with torch.no_grad():
        return family.predict(pipe, batch, text, denoiser=denoiser.eval())


def _to_diffusers_names(family, deltas: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Weights under original names -> diffusers names, by diffusers' single-file converter for the family. Its
    HunyuanVideo converter splits `single_blocks.N.linear1` at the published width (3072); for the tiny model the
    same split (q, k, v, then the MLP: ComfyUI's SingleStreamBlock order) is done here at the tiny width."""
    from diffusers.loaders import single_file_utils as sf

    convert = {
        "wan": sf.convert_wan_transformer_to_diffusers,
        "wan-i2v": sf.convert_wan_transformer_to_diffusers,
        "ltx-video": sf.convert_ltx_transformer_checkpoint_to_diffusers,
        "hunyuan-video": sf.convert_hunyuan_video_transformer_to_diffusers,
    }[family.name]
    fused = {k: v for k, v in deltas.items() if k.endswith(".linear1.weight")}
    out = convert({k: v for k, v in deltas.items() if k not in fused})
    for key, weight in fused.items():
        block = key.replace("single_blocks", "single_transformer_blocks").removesuffix(".linear1.weight")
        q, k, v, mlp = torch.split(weight, [hidden, hidden, hidden, weight.shape[0] - 3 * hidden])
        out |= {f"{block}.attn.to_q.weight": q, f"{block}.attn.to_k.weight": k, f"{block}.attn.to_v.weight": v}
        out[f"{block}.proj_mlp.weight"] = mlp
    return out


def test_comfyui_reading_of_our_file_gives_the_trained_output_for_every_module_it_can_name(comfy_family, tmp_path):
    family, folder, pipe, batch, text = comfy_family
    base = _fresh_denoiser(family, folder)
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    nameable = [n for n in linear if family.comfyui_keys.target(n) is not None]
    # every block module; left out only HunyuanVideo's timestep/pooled-text embedders and final norm, whose ComfyUI
    # names neither its diffusion-pipe alias nor diffusers' converter read
    assert all("time_text_embed" in n or n == "norm_out.linear" for n in set(linear) - set(nameable))
    trained = _with_random_lora(_fresh_denoiser(family, folder), nameable)
    expected = _predict(family, pipe, batch, text, trained)
    assert not torch.allclose(expected, _predict(family, pipe, batch, text, base), atol=1e-4)

    path = export_comfyui(family, trained, tmp_path / "comfyui_lora.safetensors")
    comfy = load_file(path)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in comfy)
    # ComfyUI's merge: W += scale * up @ down, scale 1 without `.alpha` (comfy/weight_adapter/lora.py)
    deltas = {
        key.removeprefix("diffusion_model.").removesuffix(".lora_B.weight") + ".weight": up
        @ comfy[key.replace(".lora_B.", ".lora_A.")]
        for key, up in comfy.items()
        if key.endswith(".lora_B.weight")
    }
    hidden = base.config.num_attention_heads * base.config.attention_head_dim
    state = base.state_dict()
    for key, delta in _to_diffusers_names(family, deltas, hidden).items():
        assert key in state and state[key].shape == delta.shape, key  # the name is a module of the real model
        state[key] = state[key] + delta
    merged = _fresh_denoiser(family, folder)
    merged.load_state_dict(state)
    assert torch.allclose(_predict(family, pipe, batch, text, merged), expected, atol=1e-4)


def test_diffusers_loads_our_comfyui_file_like_the_adapter(comfy_family, tmp_path):
    """diffusers' non-diffusers LoRA converters on our file. Its HunyuanVideo converter splits single blocks at
    the published width only and splits the token refiner's fused lora_A as if it were a weight, so there the LoRA
    stays on the double-stream blocks (ComfyUI's reading above covers the rest; our diffusers file is for diffusers)."""
    family, folder, pipe, batch, text = comfy_family
    targets = list(family.default_lora_targets)
    if family.name == "hunyuan-video":
        targets = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
    trained = _with_random_lora(_fresh_denoiser(family, folder), targets)
    expected = _predict(family, pipe, batch, text, trained)
    export_comfyui(family, trained, tmp_path / "comfyui_lora.safetensors")

    loaded = family.load_pipeline(str(folder))
    loaded.load_lora_weights(tmp_path, weight_name="comfyui_lora.safetensors")
    denoiser = getattr(loaded, family.denoiser_name)
    assert set(lora_modules_of(denoiser)) == set(lora_modules_of(trained))
    assert torch.allclose(_predict(family, pipe, batch, text, denoiser), expected, atol=1e-4)


def test_modules_without_a_comfyui_name_are_refused_by_name_and_other_families_write_none():
    hunyuan = get_family("hunyuan-video")
    with pytest.raises(ValueError, match=r"lora_targets: x_embedder\.proj has no ComfyUI module name"):
        hunyuan.comfyui_keys.check(["transformer_blocks.0.attn.to_q", "x_embedder.proj"])
    assert comfyui_export(get_family("cogvideox"), None) is None  # default: only the diffusers file
    with pytest.raises(ValueError, match=r"export_comfyui: ComfyUI has no LoRA loader for CogVideoX .*wan"):
        comfyui_export(get_family("cogvideox"), True)
    assert comfyui_export(hunyuan, False) is None and comfyui_export(hunyuan, None) is hunyuan.comfyui_keys
