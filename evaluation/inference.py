"""Generate from a registered model: `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) -> base pipeline from the
registered base-model reference + the LoRA (or the fully fine-tuned pipeline) -> an MP4 or GIF.

    from vidtune.evaluation.inference import generate
    generate("models:/vidtune-style@champion", "a red car in sks style", "car.mp4", num_frames=33)
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS
from vidtune.training.devices import placement
from vidtune.training.families import detect_family
from vidtune.training.media import to_uint8, write_gif, write_mp4
from vidtune.training.tracking import default_tracking_uri, vidtune_home

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class ModelNotFound(ValueError):
    """The model URI names no registered version; the message lists what is registered."""


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


def resolve_version(model_uri: str, client: MlflowClient):
    match = MODEL_URI.match(model_uri)
    if not match:
        raise ModelNotFound(f"model: {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException:
        raise ModelNotFound(f"model: {model_uri} does not exist; {_registered(client, name)}") from None


def fetch(version, tracking_uri: str) -> Path:
    """The version's files, downloaded once into $VIDTUNE_HOME/models/NAME/VERSION (then reused)."""
    import mlflow

    # Keyed by the run too: another tracking server (or a reset database) has its own "version 1".
    target = vidtune_home() / "models" / version.name / f"{version.version}-{(version.run_id or 'norun')[:12]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=target.parent))
    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # a concurrent generate got there first: theirs is the same files
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_registered_pipeline(
    model_uri: str, tracking_uri: str | None = None, lora_scale: float = 1.0, device: str | None = None
):
    """The pipeline a registered version describes, on `device` (GPU when there is one)."""
    tracking_uri = tracking_uri or default_tracking_uri()
    version = resolve_version(model_uri, MlflowClient(tracking_uri))
    local = fetch(version, tracking_uri)
    default_device, dtype = placement()  # the GPU's dtype also when offloading from the CPU
    device = device or default_device
    pipelines = sorted((local / "artifacts").glob("*/model_index.json"))
    if (
        pipelines
    ):  # a full fine-tune: the pipeline folder itself (read from safetensors; the pyfunc pickle is not loaded)
        folder = pipelines[0].parent
        return detect_family(folder).load_pipeline(str(folder), dtype=dtype).to(device), version
    base = version.tags.get("vidtune.base_model")
    family = detect_family(base)
    pipe = family.load_pipeline(base, dtype=dtype)
    pipe.load_lora_weights(str(local / "adapter_weights"), adapter_name="vidtune")
    pipe.set_adapters(["vidtune"], adapter_weights=[lora_scale])
    return pipe.to(device), version


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
) -> Path:
    """Render `prompt` with a registered model to `out` (.mp4 or .gif); returns the path."""
    out = Path(out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"out: {out} must end in .mp4 or .gif")
    pipe, version = load_registered_pipeline(model_uri, tracking_uri, lora_scale, device="cpu" if cpu_offload else None)
    if cpu_offload and torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    if vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    size = version.tags.get("vidtune.sample_size", "")
    default_frames, default_h, default_w = (int(v) for v in size.split("x")) if size else (None, None, None)
    kwargs = {
        k: v
        for k, v in {
            "num_frames": num_frames or default_frames,
            "height": height or default_h,
            "width": width or default_w,
        }.items()
        if v
    }
    frames = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).frames[0]
    video = to_uint8(frames)
    return (write_mp4 if out.suffix.lower() == ".mp4" else write_gif)(video, out, fps)
