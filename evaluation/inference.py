"""Generate from a logged or registered vidtune model: any model URI MLflow resolves (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`, `models:/NAME/latest`, `models:/m-<id>`, `runs:/<run id>/adapter`) -> the base pipeline from
the recorded base model + the LoRA (or the fully fine-tuned pipeline) -> an MP4 or GIF.

    from vidtune.evaluation.inference import generate
    generate("models:/vidtune-style@champion", "a red car in sks style", "car.mp4", num_frames=33)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vidtune.evaluation.pyfunc import build_pipeline, render
from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS
from vidtune.training.families import get_family
from vidtune.training.media import read_image, write_gif, write_mp4
from vidtune.training.tracking import default_tracking_uri, point_mlflow_at, vidtune_home


class ModelNotFound(ValueError):
    """The model URI names no logged model; the message lists what is registered."""


def _registered(client: MlflowClient, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        names = sorted(m.name for m in client.search_registered_models())
        return f"no model named {name!r} is registered (registered: {', '.join(names) or 'none'})"
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    lines = [
        f"v{v.version}" + (f" [{', '.join(sorted(aliases[str(v.version)]))}]" if str(v.version) in aliases else "")
        for v in sorted(versions, key=lambda v: int(v.version))
    ]
    return f"registered versions of {name}: {'; '.join(lines)}"


def resolve(model_uri: str, tracking_uri: str):
    """MLflow's own resolution of `model_uri` to a logged model (its ModelInfo); ModelNotFound says what exists."""
    from mlflow.models import get_model_info
    from mlflow.store.artifact.utils.models import _parse_model_uri

    point_mlflow_at(tracking_uri)
    try:
        return get_model_info(model_uri)
    except (MlflowException, OSError):
        hint = ""
        if model_uri.startswith("models:/"):
            try:
                name = _parse_model_uri(model_uri).name
                hint = f"; {_registered(MlflowClient(tracking_uri), name)}" if name else ""
            except MlflowException:
                hint = (
                    "; model URIs are models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or models:/m-<id>"
                )
        raise ModelNotFound(f"model: {model_uri} does not exist{hint}") from None


def fetch(model_uri: str, info, tracking_uri: str) -> Path:
    """The logged model's files, downloaded once into $VIDTUNE_HOME/models/<model id> (then reused): keyed by what
    the URI resolved to, so `@champion` moving to another version downloads that one."""
    import mlflow

    target = vidtune_home() / "models" / info.model_uuid
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.model_uuid}.", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp), tracking_uri=tracking_uri)
        try:
            tmp.rename(target)
        except OSError:  # a concurrent generate got there first: theirs is the same files
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_files(local: Path) -> tuple[dict, dict[str, str]]:
    """The model config and artifact paths the MLmodel file of a downloaded vidtune model records."""
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("python_function", {})
    config = flavor.get("config") or flavor.get("model_config") or {}
    if "family" not in config:
        raise ModelNotFound(
            f"model: {local} was not logged by this vidtune (no video model config); register its run again with "
            "vidtune register RUN"
        )
    artifacts = {name: str(local / entry["path"]) for name, entry in (flavor.get("artifacts") or {}).items()}
    return config, artifacts


def load_registered_pipeline(
    model_uri: str,
    tracking_uri: str | None = None,
    lora_scale: float = 1.0,
    device: str | None = None,
    base_model: str | None = None,
):
    """The pipeline a logged model describes, on `device` (GPU when there is one), and its model config."""
    tracking_uri = tracking_uri or default_tracking_uri()
    info = resolve(model_uri, tracking_uri)
    config, artifacts = model_files(fetch(model_uri, info, tracking_uri))
    return build_pipeline(config, artifacts, base_model=base_model, device=device, lora_scale=lora_scale), config


def generate(
    model_uri: str,
    prompt: str,
    out: str | Path,
    *,
    tracking_uri: str | None = None,
    lora_scale: float = 1.0,
    steps: int = INFERENCE_STEPS,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance_scale: float = GUIDANCE_SCALE,
    fps: int = FPS,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
    base_model: str | None = None,
    image: str | Path | None = None,
) -> Path:
    """Render `prompt` with a registered model to `out` (.mp4 or .gif); returns the path. `image`: the first frame,
    for a model of an image-to-video family (required there, refused for text-to-video)."""
    out = Path(out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"out: {out} must end in .mp4 or .gif")
    tracking_uri = tracking_uri or default_tracking_uri()
    config, artifacts = model_files(fetch(model_uri, resolve(model_uri, tracking_uri), tracking_uri))
    # checked before any weights load: the image and the model's family must agree
    conditioning = get_family(config["family"]).sampling_arguments(read_image(image) if image is not None else None)
    device = "cpu" if cpu_offload else None
    pipe = build_pipeline(config, artifacts, base_model=base_model, device=device, lora_scale=lora_scale)
    if cpu_offload and torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    if vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    default_frames, default_h, default_w = config.get("sample_size") or (None, None, None)
    video = render(
        pipe,
        prompt,
        num_frames=num_frames or default_frames,
        height=height or default_h,
        width=width or default_w,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        conditioning=conditioning,
    )
    return (write_mp4 if out.suffix.lower() == ".mp4" else write_gif)(video, out, fps)
