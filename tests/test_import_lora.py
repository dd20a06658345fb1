"""LoRA files of other trainers' formats, built here from a tiny model's LoRA (the formats as their projects document
them: diffusers/peft keys; `diffusion_model.<original module>` with lora_A/B or lora_down/up and `.alpha`; kohya's
`lora_unet_<module_with_underscores>.lora_down/up.weight` + `.alpha`), imported, and checked to give the same
denoiser output as the weights they were made from; then the `import-lora` command end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_comfyui import _fresh_denoiser, _predict, _with_random_lora, comfy_family  # noqa: F401  (fixture)
from vidtune.training.adapters import export_comfyui, lora_state_dict
from vidtune.training.lora_import import detect_format, import_lora

ALPHA_SCALE = 4.0  # the files below say alpha = 4 x rank, with lora_B divided by 4: the importer must apply it


def _original_format(family, trained, tmp_path, down_up: bool) -> dict[str, torch.Tensor]:
    """`diffusion_model.<original module>` keys with an explicit alpha (ComfyUI / diffusion-pipe / musubi style)."""
    comfy = load_file(export_comfyui(family, trained, tmp_path / "comfy.safetensors"))
    out = {}
    for key, tensor in comfy.items():
        module, _, kind = key.rpartition(".lora_")
        if kind == "B.weight":
            out[f"{module}.{'lora_up.weight' if down_up else 'lora_B.weight'}"] = tensor / ALPHA_SCALE
            out[f"{module}.alpha"] = torch.tensor(ALPHA_SCALE * comfy[f"{module}.lora_A.weight"].shape[0])
        else:
            out[f"{module}.{'lora_down.weight' if down_up else 'lora_A.weight'}"] = tensor
    return out


def _kohya_format(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya / musubi-tuner keys: `lora_unet_` + the original module path with dots as underscores."""
    out = {}
    for key, tensor in original.items():
        module, _, kind = key.removeprefix("diffusion_model.").rpartition(".lora_")
        if key.endswith(".alpha"):
            module, kind = key.removeprefix("diffusion_model.").removesuffix(".alpha"), "alpha"
        kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(kind, kind)
        out[f"lora_unet_{module.replace('.', '_')}.{kind}"] = tensor
    return out


@pytest.mark.parametrize("file_format", ["diffusers", "original", "original-down-up", "kohya"])
def test_each_format_imports_to_the_same_denoiser_output(comfy_family, file_format, tmp_path):  # noqa: F811
    family, folder, pipe, batch, text = comfy_family
    trained = _with_random_lora(_fresh_denoiser(family, folder), list(family.default_lora_targets), seed=3)
    expected = _predict(family, pipe, batch, text, trained)
    if file_format == "diffusers":
        state = {f"{family.denoiser_name}.{k}": v for k, v in lora_state_dict(trained).items()}
        state = {k: (v * 2 if ".lora_B." in k else v) for k, v in state.items()}  # peft scale 2 (alpha 8, rank 4)
    else:
        state = _original_format(family, trained, tmp_path, down_up=file_format == "original-down-up")
        state = _kohya_format(state) if file_format == "kohya" else state
    save_file(state, str(tmp_path / "lora.safetensors"))

    fresh = family.load_pipeline(str(folder))
    imported = import_lora(family, fresh, load_file(tmp_path / "lora.safetensors"))
    assert imported.source_format == file_format.removesuffix("-down-up")
    fresh.load_lora_weights(imported.state, adapter_name="default")
    assert torch.allclose(
        _predict(family, pipe, batch, text, getattr(fresh, family.denoiser_name)), expected, atol=1e-4
    )


def test_a_file_that_is_not_a_lora_of_the_base_is_refused_naming_what_does_not_fit(comfy_family):  # noqa: F811
    family, folder, *_ = comfy_family
    with pytest.raises(ValueError, match="not a LoRA in a format vidtune reads"):
        detect_format({"model.weight": torch.zeros(2, 2)})
    wrong = {"diffusion_model.no_such_block.lora_A.weight": torch.zeros(4, 8)}
    wrong["diffusion_model.no_such_block.lora_B.weight"] = torch.zeros(8, 4)
    with pytest.raises(ValueError, match=r"does not fit this .* model .*no_such_block"):
        import_lora(family, family.load_pipeline(str(folder)), wrong)
