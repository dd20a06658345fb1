"""vidtune's MLflow model: every registered version (a LoRA or a full fine-tune) is this pyfunc, so it loads with
`mlflow.pyfunc.load_model("models:/NAME@champion")` and serves with `mlflow models serve -m models:/NAME@champion`.

`predict` takes one row per video (`prompt`, and for a model of an image-to-video family such as `ltx-video-i2v`
`image`: the video's first frame as base64-encoded PNG or JPEG bytes, required in every row there and refused by a
text-to-video model) and the rendering settings as params (`num_frames`, `height`, `width`: 0 = the training clips';
`steps`, `guidance_scale`, `seed`, `lora_scale`, `fps`), and returns one row per video: the `prompt`, the `video` as a
base64-encoded MP4, and its `num_frames`, `height`, `width`, `fps`. A request the model cannot render (a missing or
unreadable image) is refused before any weights load, with a message naming the column (HTTP 400 when served).

The model is logged "from code" (`python_model` is the file `vidtune_model.py`, which only names the class), so no
pickle is written or loaded; the weights are the run's safetensors, carried as artifacts (`adapter` or `pipeline`),
and the base model is in the model config (`base_model`, and `base_model_hub_id` for another machine)."""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS

SIGNATURE = ModelSignature(
    # `image` is optional in the schema so that text-to-video requests stay valid; `predict` requires it per family
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]),
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


class InvalidRequest(MlflowException):
    """A request this model cannot render; MLflow's scoring server answers it with HTTP 400 and the message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def input_example(sample_size: tuple[int, int, int], family: str | None = None) -> tuple[pd.DataFrame, dict]:
    """A request as the signature takes it: prompts as rows (with a first frame for an image-to-video family's
    model: a grey PNG of the sample size), the rendering settings as params."""
    from vidtune.training.families import get_family

    frames, height, width = sample_size
    params = {"num_frames": frames, "height": height, "width": width, "steps": INFERENCE_STEPS}
    rows = {"prompt": ["a city street at night"]}
    if family is not None and get_family(family).image_conditioned:
        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (width, height), (128, 128, 128)).save(png, format="PNG")
        rows["image"] = [base64.b64encode(png.getvalue()).decode("ascii")]
    return pd.DataFrame(rows), {**params, "guidance_scale": GUIDANCE_SCALE, "seed": 0}


def decode_image(encoded: str, row: int):
    """A row's `image` (base64 PNG or JPEG bytes; a `data:image/...;base64,` prefix and line breaks are allowed) as
    an RGB PIL image. Other formats are not opened, and an image past Pillow's decompression-bomb limit is refused
    rather than decoded."""
    from PIL import Image

    encoded = "".join(encoded.split())
    try:
        data = base64.b64decode(encoded.partition(",")[2] if encoded.startswith("data:") else encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(
            f"image: row {row} is not base64 ({exc}); send the PNG or JPEG file's bytes base64-encoded"
        ) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
                return image.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(
            f"image: row {row} is not a PNG or JPEG image this model can read ({type(exc).__name__}: {exc})"
        ) from exc


def row_conditioning(family, rows: pd.DataFrame) -> list[dict]:
    """Each row's pipeline conditioning (`family.sampling_arguments`): for an image-to-video family its `image`,
    which every row needs; a text-to-video family refuses any. Checked before the pipeline loads."""
    images = list(rows["image"]) if "image" in rows else [None] * len(rows)
    given = [row for row, image in enumerate(images) if isinstance(image, str) and image.strip()]
    if not family.image_conditioned:
        if given:
            raise InvalidRequest(
                f"image: {family.title} ({family.name}) generates from text only; leave out the image column "
                f"(given in row {', '.join(map(str, given))})"
            )
        return [{} for _ in images]
    missing = [row for row in range(len(images)) if row not in given]
    if missing:
        raise InvalidRequest(
            f"image: {family.title} ({family.name}) starts each video from a conditioning image, its first frame: "
            f"give every row an image column, the base64-encoded PNG or JPEG bytes (missing in row "
            f"{', '.join(map(str, missing))})"
        )
    return [family.sampling_arguments(decode_image(image, row)) for row, image in enumerate(images)]


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

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # A DataFrame hint: MLflow infers no schema from it (the logged SIGNATURE is the schema) and, unlike no hint,
        # prints no "Add type hints" warning on every import.
        from vidtune.training.families import get_family

        params = {spec.name: spec.default for spec in SIGNATURE.params.params} | (params or {})
        scale, fps = float(params["lora_scale"]), int(params["fps"])
        rows = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"prompt": list(model_input)})
        conditioning = row_conditioning(get_family(self.config["family"]), rows)  # refused before weights load
        if self.pipe is None or scale != self.scale:  # built on first use: `load_model` stays cheap
            self.pipe, self.scale = build_pipeline(self.config, self.artifacts, lora_scale=scale), scale
        frames, height, width = self.config.get("sample_size") or (None, None, None)
        out = []
        for prompt, arguments in zip(rows["prompt"], conditioning, strict=True):
            video = render(
                self.pipe,
                prompt,
                num_frames=params["num_frames"] or frames,
                height=params["height"] or height,
                width=params["width"] or width,
                steps=int(params["steps"]),
                guidance_scale=float(params["guidance_scale"]),
                seed=int(params["seed"]),
                conditioning=arguments,
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
