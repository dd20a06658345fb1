"""The minimum diffusers and MLflow that pyproject.toml requires are what vidtune's calls need: the installed
versions satisfy them, and every API vidtune calls that those minimums introduced is there by the name we use."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _minimum(package: str) -> Version:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == package]
    (spec,) = [s for s in requirement.specifier if s.operator == ">="]
    return Version(spec.version)


def test_installed_versions_meet_the_minimums():
    for package, floor in (("diffusers", "0.40"), ("mlflow", "3.0")):
        assert _minimum(package) >= Version(floor), package  # what the calls below need
        assert Version(version(package)) >= _minimum(package), package


def test_the_diffusers_api_vidtune_calls():
    import diffusers
    from diffusers.loaders import lora_conversion_utils, single_file_utils

    source = inspect.getsource(diffusers.DiffusionPipeline.from_pretrained)
    assert 'kwargs.pop("dtype"' in source  # from_pretrained(..., dtype=) (0.40)
    for pipeline in ("WanPipeline", "LTXPipeline", "HunyuanVideoPipeline", "CogVideoXPipeline", "AnimateDiffPipeline"):
        assert callable(getattr(getattr(diffusers, pipeline), "lora_state_dict")), pipeline
    assert hasattr(diffusers.ModelMixin, "enable_layerwise_casting")  # fp8_storage
    for name in (
        "convert_wan_transformer_to_diffusers",
        "convert_ltx_transformer_checkpoint_to_diffusers",
        "convert_hunyuan_video_transformer_to_diffusers",
    ):
        assert hasattr(single_file_utils, name), name  # the names our ComfyUI keys are checked against
    assert hasattr(lora_conversion_utils, "_convert_non_diffusers_wan_lora_to_diffusers")


def test_the_mlflow_api_vidtune_calls():
    import mlflow.pyfunc
    from mlflow.models import get_model_info, set_model
    from mlflow.models.model import ModelInfo
    from mlflow.store.artifact.utils.models import _parse_model_uri
    from mlflow.types.schema import ParamSchema, ParamSpec

    assert {"name", "model_config", "python_model", "artifacts", "signature", "input_example"} <= set(
        inspect.signature(mlflow.pyfunc.log_model).parameters
    )
    assert {"model_id", "model_uuid"} <= set(dir(ModelInfo))
    assert _parse_model_uri("models:/m-0123").model_id == "m-0123"  # MLflow 3 logged-model URIs
    assert callable(get_model_info) and callable(set_model) and ParamSchema([ParamSpec("seed", "long", 0)])
    assert callable(mlflow.data.from_pandas) and hasattr(mlflow.tracking.MlflowClient, "log_inputs")
