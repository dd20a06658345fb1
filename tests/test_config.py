"""Parameters: YAML + --set overrides, and invalid values rejected before any work with the field named."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vidtune.flows.cli import app
from vidtune.flows.config import ParamError, build_params, parse_overrides
from vidtune.flows.curate import CurateParams


def test_overrides_are_nested_and_typed():
    assert parse_overrides(["scenes.threshold=30", "workers=4", "overwrite=true", "clips.preset=fast"]) == {
        "scenes": {"threshold": 30},
        "workers": 4,
        "overwrite": True,
        "clips": {"preset": "fast"},
    }


def test_config_file_then_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("scenes:\n  threshold: 20\n  max_clip_s: 4\nclips:\n  fps: 24\n")
    params = build_params(
        CurateParams, base={"input": "in", "output": "out"}, config=config, overrides=["scenes.threshold=33"]
    )
    assert (params.scenes.threshold, params.scenes.max_clip_s, params.clips.fps) == (33, 4, 24)


def test_only_true_and_false_are_booleans_in_config_files_and_overrides(tmp_path):
    from vidtune.flows.finetune import FinetuneParams

    config = tmp_path / "c.yaml"
    config.write_text(
        "mixed_precision: no\ngradient_checkpointing: false\ncurate: {input: raw, output: ds, captions: {trigger: on}}\n"
    )
    params = build_params(
        FinetuneParams, base={"model": "m", "out": "o"}, config=config, overrides=["export_comfyui=true"]
    )
    assert (params.mixed_precision, params.gradient_checkpointing, params.export_comfyui) == ("no", False, True)
    assert params.curate.captions.trigger == "on" and params.data == "ds"  # YAML 1.1 would have made these booleans
    assert (
        build_params(
            FinetuneParams, base={"data": "d", "model": "m", "out": "o"}, overrides=["mixed_precision=no"]
        ).mixed_precision
        == "no"
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ("scenes.min_clip_s=-1", "scenes.min_clip_s"),
        ("scenes.max_clip_s=0", "scenes.max_clip_s"),
        ("scenes.trim_frames=-2", "scenes.trim_frames"),
        ("scenes.detector=histogramz", "scenes.detector"),
        ("clips.width=100", "clips.width"),
        ("workers=0", "workers"),
        ("scenes.thresold=3", "scenes.thresold"),
    ],
)
def test_invalid_parameters_name_the_field(override, field):
    with pytest.raises(ParamError, match=field.replace(".", r"\.")):
        build_params(CurateParams, base={"input": "in", "output": "out"}, overrides=[override])


def test_min_above_max_names_both_fields():
    with pytest.raises(ParamError, match=r"min_clip_s \(6.0\) must not be greater than max_clip_s \(5.0\)"):
        build_params(CurateParams, base={"input": "i", "output": "o"}, overrides=["scenes.min_clip_s=6"])


def test_cli_rejects_bad_parameters_before_any_work(tmp_path):
    out = tmp_path / "never-created"
    result = CliRunner().invoke(
        app, ["curate", str(tmp_path), str(out), "--set", "scenes.min_clip_s=9", "--set", "scenes.max_clip_s=2"]
    )
    assert result.exit_code == 2
    assert "scenes: min_clip_s (9.0) must not be greater than max_clip_s (2.0)" in result.output
    assert not out.exists()


def test_cli_help_explains_commands():
    result = CliRunner().invoke(app, ["curate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("INPUT", "OUTPUT", "--config", "--set", "--strict", "manifest"):
        assert word in result.output


def test_list_params_shows_every_key_with_its_default():
    result = CliRunner().invoke(app, ["curate", "--list-params"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for key in ("scenes.threshold", "scenes.min_clip_s", "clips.width", "shards.max_shard_mb", "workers"):
        assert key in result.output
    assert "27.0" in result.output and "832" in result.output


def test_cli_missing_input_fails_fast_naming_it(tmp_path):
    result = CliRunner().invoke(app, ["curate", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "input:" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_positional_arguments_win_over_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input: from-file\noutput: from-file\nworkers: 3\n")
    params = build_params(CurateParams, base={"input": "arg-in", "output": "arg-out"}, config=config)
    assert (params.input, params.output, params.workers) == ("arg-in", "arg-out", 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["captions.template={trigerr}, {source_name}"], "captions: template: unknown field"),
        (["scenes.min_clip_s=0.05", "clips.fps=8"], "shorter than one frame at clips.fps"),
        (["scores.clip=false", "filters.dedup_threshold=0.99"], "filters.dedup_threshold needs the CLIP score"),
        (["filters.max_text_area=5"], "filters.max_text_area needs the text-area score"),
        (["filters.min_aesthetic=5"], "filters.min_aesthetic needs scores.aesthetic_head"),
    ],
)
def test_inconsistent_parameters_are_rejected_up_front(overrides, message):
    with pytest.raises(ParamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_params(CurateParams, base={"input": "i", "output": "o"}, overrides=overrides)


def test_template_values_pass_through_set_as_strings():
    params = build_params(
        CurateParams, base={"input": "i", "output": "o"}, overrides=["captions.template={trigger}, {sidecar}"]
    )
    assert params.captions.template == "{trigger}, {sidecar}"


@pytest.mark.parametrize("override", ["evaluation.gpu_limit=gpu", "registry.tracking_uri=sqlite:///x.db"])
def test_finetune_has_no_field_that_does_nothing_and_the_standalone_flows_keep_theirs(override):
    """Inside finetune, its own gpu_limit and tracking_uri cover evaluation and registration: no second copy."""
    from vidtune.flows.evaluate import EvaluateParams, RegisterParams
    from vidtune.flows.finetune import FinetuneParams

    with pytest.raises(ParamError, match=override.split("=")[0].replace(".", r"\.")):
        build_params(FinetuneParams, base={"data": "d", "model": "m", "out": "o"}, overrides=[override])
    assert build_params(EvaluateParams, base={}, overrides=["gpu_limit=null"]).gpu_limit is None
    assert (
        build_params(RegisterParams, base={}, overrides=["tracking_uri=sqlite:///x.db"]).tracking_uri
        == "sqlite:///x.db"
    )


def test_clip_model_null_turns_the_clip_score_off():
    from vidtune.tasks.scoring import ScoreParams

    assert ScoreParams(clip_model=None).clip is False and ScoreParams().clip is True
