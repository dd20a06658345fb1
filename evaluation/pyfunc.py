"""vidtune's MLflow model: every registered version (a LoRA or a full fine-tune) is this pyfunc, so it loads with
`mlflow.pyfunc.load_model("models:/NAME@champion")` and serves with `mlflow models serve -m models:/NAME@champion`.

`predict` takes one row per video (`prompt`) and the rendering settings as params (`num_frames`, `height`, `width`:
0 = the training clips'; `steps`, `guidance_scale`, `seed`, `lora_scale`, `fps`), and returns one row per video:
the `prompt`, the `video` as a base64-encoded MP4, and its `num_frames`, `height`, `width`, `fps`.

The model is logged "from code" (`python_model` is the file `vidtune_model.py`, which only names the class), so no
pickle is written or loaded; the weights are the run's safetensors, carried as artifacts (`adapter` or `pipeline`),
and the base model is in the model config (`base_model`, and `base_model_hub_id` for another machine)."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "video"),  # base64 MP4 (H.264)
            ColSpec("long", "num_frames"),
            ColSpec("long", "height"),
            ColSpec("long", "width"),
            ColSpec("long", "fps"),
        ]
    ),
    # per request, not per row: optional integers in rows would arrive as NaN floats, which MLflow's schema refuses
    params=ParamSchema(
        [
            ParamSpec("num_frames", "long", 0),  # 0: the training clips' (the logged sample size)
            ParamSpec("height", "long", 0),
            ParamSpec("width", "long", 0),
            ParamSpec("steps", "long", INFERENCE_STEPS),
            ParamSpec("guidance_scale", "double", GUIDANCE_SCALE),
            ParamSpec("seed", "long", 0),
            ParamSpec("lora_scale", "double", 1.0),
            ParamSpec("fps", "long", FPS),
        ]
    ),
)
MODEL_CODE = Path(__file__).with_name("vidtune_model.py")


class BaseModelMissing(ValueError):
    """The recorded base model is neither a local folder here nor reachable as a hub id."""


def input_example(sample_size: tuple[int, int, int]) -> tuple[pd.DataFrame, dict]:
    """A request as the signature takes it: prompts as rows, the rendering settings as params."""
    frames, height, width = sample_size
    params = {"num_frames": frames, "height": height, "width": width, "steps": INFERENCE_STEPS}
    return pd.DataFrame({"prompt": ["a city street at night"]}), {**params, "guidance_scale": GUIDANCE_SCALE, "seed": 0}


def resolve_base_model(config: dict, override: str | None = None) -> str:
    """The base model to load: `override`, else the recorded local folder when it exists here, else its hub id."""
    if override:
        return override
    base, hub_id = config.get("base_model"), config.get("base_model_hub_id")
    if base and (Path(base).expanduser().is_dir() or not base.startswith(("/", ".", "~"))):
        return base
    if hub_id:
        return hub_id
    raise BaseModelMissing(
        f"base model {base} (recorded by this version) is not on this machine and no hub id was recorded; "
        "pass the base model's local folder or hub id (vidtune generate --base-model PATH_OR_HUB_ID)"
    )


def build_pipeline(config: dict, artifacts: dict[str, str], base_model: str | None = None, device=None, lora_scale=1.0):
    """The pipeline a version describes: the fine-tuned pipeline folder, or the base model plus the LoRA."""
    from vidtune.training.adapters import load_adapter
    from vidtune.training.devices import placement
    from vidtune.training.families import detect_family, get_family

    default_device, dtype = placement()
    device = device or default_device
    if "pipeline" in artifacts:
        folder = artifacts["pipeline"]
        return detect_family(folder).load_pipeline(folder, dtype=dtype).to(device)
    family = get_family(config["family"])
    base = resolve_base_model(config, base_model)
    try:
        pipe = family.load_pipeline(base, dtype=dtype)
    except (OSError, ValueError) as exc:  # a hub id offline or unknown, a folder that is not a diffusers model
        raise BaseModelMissing(
            f"base model {base} cannot be loaded here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"this version was trained on {config.get('base_model')}: pass that model's local folder or hub id "
            "(vidtune generate --base-model PATH_OR_HUB_ID)"
        ) from exc
    load_adapter(pipe, artifacts["adapter"], adapter_name="vidtune", scale=lora_scale)  # both experts' files
    return pipe.to(device)


def render(pipe, prompt: str, *, num_frames, height, width, steps, guidance_scale, seed, conditioning=None):
    """One video as uint8 (frames, h, w, 3); `conditioning`: the family's `sampling_arguments` (an image)."""
    import torch

    from vidtune.training.media import to_uint8

    pipe.set_progress_bar_config(disable=True)
    sizes = {"num_frames": num_frames, "height": height, "width": width}
    frames = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **{k: int(v) for k, v in sizes.items() if v},
        **(conditioning or {}),
    ).frames[0]
    return to_uint8(frames)


def mp4_bytes(video, fps: int) -> bytes:
    from vidtune.training.media import write_mp4

    with tempfile.TemporaryDirectory() as tmp:
        return write_mp4(video, Path(tmp) / "video.mp4", fps).read_bytes()


class VideoPipelineModel(mlflow.pyfunc.PythonModel):
    """Prompts in, base64 MP4s out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.config = dict(context.model_config or {})
        self.artifacts = dict(context.artifacts)
        self.pipe, self.scale = None, None

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        params = {spec.name: spec.default for spec in SIGNATURE.params.params} | (params or {})
        scale, fps = float(params["lora_scale"]), int(params["fps"])
        if self.pipe is None or scale != self.scale:  # built on first use: `load_model` stays cheap
            self.pipe, self.scale = build_pipeline(self.config, self.artifacts, lora_scale=scale), scale
        frames, height, width = self.config.get("sample_size") or (None, None, None)
        prompts = list(model_input["prompt"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        out = []
        for prompt in prompts:
            video = render(
                self.pipe,
                prompt,
                num_frames=params["num_frames"] or frames,
                height=params["height"] or height,
                width=params["width"] or width,
                steps=int(params["steps"]),
                guidance_scale=float(params["guidance_scale"]),
                seed=int(params["seed"]),
            )
            out.append(
                {
                    "prompt": prompt,
                    "video": base64.b64encode(mp4_bytes(video, fps)).decode("ascii"),
                    "num_frames": video.shape[0],
                    "height": video.shape[1],
                    "width": video.shape[2],
                    "fps": fps,
                }
            )
        return pd.DataFrame(out)
