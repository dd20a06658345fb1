"""LoRA files of other trainers' formats, built here from a tiny model's LoRA (the formats as their projects document
them: diffusers/peft keys; `diffusion_model.<original module>` with lora_A/B or lora_down/up and `.alpha`; kohya's
`lora_unet_<module_with_underscores>.lora_down/up.weight` + `.alpha`), imported, and checked to give the same
denoiser output as the weights they were made from; a two-expert model's pair of files (Wan 2.2 A14B's high_noise
and low_noise LoRAs) through `vidtune import-lora`; the command with one file end to end is in test_registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_comfyui import _fresh_denoiser, _predict, _with_random_lora, comfy_family  # noqa: F401  (fixture)
from tests.test_families import _render
from vidtune.training.adapters import export_comfyui, lora_state_dict
from vidtune.training.experts import ADAPTER_FILES
from vidtune.training.families import get_family, model_index
from vidtune.training.lora_import import check_expert_files, detect_format, import_lora
from vidtune.training.tiny_models import build_tiny

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


@pytest.fixture(scope="module")
def a14b(tmp_path_factory) -> str:
    """The tiny Wan 2.2 T2V-A14B: `transformer` denoises high noise levels, `transformer_2` low ones."""
    return str(build_tiny("wan2.2-t2v-a14b", tmp_path_factory.mktemp("a14b") / "model"))


def _expert_file(model: str, seed: int, path, file_format: str):
    """A random LoRA of a Wan expert as another trainer writes it (kohya: musubi-tuner's high_noise/low_noise files;
    original: ComfyUI's), on attention and FFN: diffusers' musubi converter reads only files with all of them."""
    family = get_family("wan")
    targets = [*family.default_lora_targets, "ffn.net.0.proj", "ffn.net.2"]
    trained = _with_random_lora(_fresh_denoiser(family, model), targets, seed=seed)
    state = _original_format(family, trained, path.parent, down_up=file_format == "original")
    save_file(_kohya_format(state) if file_format == "kohya" else state, str(path))
    return path


def test_a_two_expert_models_pair_of_loras_imports_into_one_run_that_renders_as_diffusers_loads_them(
    a14b, prefect_api, vidtune, tmp_path
):
    """musubi-tuner's high_noise file and a ComfyUI low_noise file, through `vidtune import-lora FILE --file-2 FILE`:
    the run folder is a trained two-expert run's, and what `vidtune generate` builds from it renders what diffusers
    renders with the two files loaded directly (the second with `load_into_transformer_2`)."""
    from vidtune.evaluation.pyfunc import build_pipeline

    high = _expert_file(a14b, 1, tmp_path / "style_high_noise.safetensors", "kohya")
    low = _expert_file(a14b, 2, tmp_path / "style_low_noise.safetensors", "original")
    settings = ["prompts=[a red car]", "inference_steps=2", "num_frames=9", "height=32", "width=32", "clip_model=null"]
    code, printed = vidtune(
        *("import-lora", str(high), "--file-2", str(low), "--model", a14b, "--out", str(tmp_path / "imported")),
        *("--set=run_registration=false", *(f"--set=evaluation.{setting}" for setting in settings)),
    )
    assert code == 0, printed
    assert "kohya + original-format LoRA (rank 4, 40 modules" in printed, printed
    adapter = tmp_path / "imported" / "adapter"
    assert json.loads((adapter / "vidtune.json").read_text())["adapter_files"] == ADAPTER_FILES
    assert {p.name for p in adapter.glob("comfyui_lora*")} == {
        "comfyui_lora.safetensors",
        "comfyui_lora_transformer_2.safetensors",
    }
    assert json.loads((tmp_path / "imported" / "train_job.json").read_text())["params"]["experts"] == "both"
    assert (tmp_path / "imported" / "evaluation" / "metrics.json").is_file()

    family = get_family("wan")
    imported = _render(
        build_pipeline({"family": "wan", "base_model": a14b}, {"adapter": str(adapter)}, device="cpu"), family
    )
    direct = family.load_pipeline(a14b)
    base = _render(direct, family)
    direct.load_lora_weights(str(high))
    direct.load_lora_weights(str(low), load_into_transformer_2=True)
    expected = _render(direct, family)
    assert np.abs(imported - expected).max() < 1e-4 and np.abs(expected - base).max() > 1e-2


def test_a_second_file_is_refused_for_one_denoiser_and_a_low_noise_file_as_the_first(
    a14b, prefect_api, vidtune, tmp_path
):
    five_b = str(build_tiny("wan2.2-ti2v-5b", tmp_path / "5b"))  # Wan 2.2's one-denoiser model
    for name in ("high.safetensors", "low.safetensors"):
        (tmp_path / name).write_bytes(b"refused before it is read")
    code, printed = vidtune(
        "import-lora",
        str(tmp_path / "high.safetensors"),
        "--file-2",
        str(tmp_path / "low.safetensors"),
        "--model",
        five_b,
    )
    assert code == 2 and "file_2: " in printed and "has one denoiser; file_2 is the low-noise expert's" in printed
    check_expert_files("style_low_noise.safetensors", None, model_index(five_b), str(five_b))  # no experts to mix up
    config = model_index(a14b)
    check_expert_files("style_high_noise.safetensors", "style_low_noise.safetensors", config, a14b)
    check_expert_files("style.safetensors", None, config, a14b)  # the high-noise expert alone
    with pytest.raises(ValueError, match=r"^file: style_low_noise.safetensors is named as the low-noise expert's"):
        check_expert_files("style_low_noise.safetensors", "style_high_noise.safetensors", config, a14b)
    with pytest.raises(ValueError, match=r"^file_2: b_HIGH-noise.safetensors is named as the high-noise expert's"):
        check_expert_files("a.safetensors", "b_HIGH-noise.safetensors", config, a14b)


def test_a_clip_model_that_cannot_load_is_refused_before_conversion_naming_the_evaluation_keys(
    a14b, prefect_api, vidtune, tmp_path
):
    """The keys as users type them (`--set evaluation.clip_pretrained=...`), not the evaluate flow's own names."""
    (tmp_path / "style.safetensors").write_bytes(b"refused before it is read")
    code, printed = vidtune(
        "import-lora",
        str(tmp_path / "style.safetensors"),
        "--model",
        a14b,
        "--set",
        f"evaluation.clip_pretrained={tmp_path / 'no-such-weights.bin'}",
    )
    assert code == 2 and "evaluation.clip_model/evaluation.clip_pretrained: cannot load open_clip" in printed
    assert "--set evaluation.clip_pretrained=PATH" in printed and "converted by" not in printed  # before conversion
