"""An image-to-video version (`ltx-video-i2v`) as MLflow serves it: a registered tiny LoRA version, loaded with
`mlflow.pyfunc.load_model`, renders each row from its `image` column (base64 PNG or JPEG), and refuses a request
without one, naming the column, before any weights load (HTTP 400 from the app `mlflow models serve` runs); a
text-to-video model refuses the column."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tests.test_comfyui import _with_random_lora
from tests.test_families import _image
from vidtune.evaluation.pyfunc import decode_image, row_conditioning
from vidtune.evaluation.registry import register_run
from vidtune.training.adapters import save_lora_adapter
from vidtune.training.families import get_family
from vidtune.training.job import TrainJob
from vidtune.training.layout import RunLayout
from vidtune.training.params import TrainParams
from vidtune.training.tiny_models import build_tiny

I2V = get_family("ltx-video-i2v")


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str]:
    """A run of the tiny LTX-Video checkpoint as image-to-video with a random LoRA, registered in a SQLite MLflow:
    (model URI, tracking URI)."""
    root = tmp_path_factory.mktemp("i2v")
    model, uri, layout = str(build_tiny("ltx-video", root / "model")), f"sqlite:///{root}/mlflow.db", RunLayout(root)
    pipe = I2V.load_pipeline(model)
    _with_random_lora(pipe.transformer, list(I2V.default_lora_targets))
    info = {"base_model": model, "family": I2V.name, "training_type": "lora"}
    save_lora_adapter(I2V, pipe, {"transformer": pipe.transformer}, layout.adapter, info)
    job = TrainJob(
        model=model,
        out=str(root),
        family=I2V.name,
        tracking_uri=uri,
        shards=[],
        frame_buckets=[9],
        sample_size=(9, 32, 32),
        params=TrainParams(rank=4),
    )
    job.write()
    return register_run(root, "i2v-style", uri).model_uri, uri


def _encoded(image, image_format: str) -> str:
    data = io.BytesIO()
    image.save(data, format=image_format)
    return base64.b64encode(data.getvalue()).decode("ascii")


def _frames(video: str) -> np.ndarray:
    with av.open(io.BytesIO(base64.b64decode(video))) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_request_renders_from_each_rows_image_and_one_without_an_image_is_refused(registered, monkeypatch):
    import mlflow
    from mlflow.pyfunc.scoring_server import init
    from starlette.testclient import TestClient

    model_uri, tracking_uri = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    schema = model.metadata.get_input_schema()
    assert [(column.name, column.required) for column in schema.inputs] == [("prompt", True), ("image", False)]
    example = model.input_example  # validated by MLflow at logging, by rendering it
    assert decode_image(example["image"][0], 0).size == (32, 32)  # a first frame of the logged sample size
    with pytest.raises(MlflowException, match=r"^image: LTX-Video image-to-video .*give every row an image column"):
        model.predict(pd.DataFrame({"prompt": ["a red car"]}), params={"steps": 2})
    not_an_image = base64.b64encode(b"not an image").decode("ascii")
    with pytest.raises(MlflowException, match=r"^image: row 0 is not a PNG or JPEG image"):
        model.predict(pd.DataFrame({"prompt": ["a red car"], "image": [not_an_image]}), params={"steps": 2})
    assert model.unwrap_python_model().pipe is None  # refused before the weights loaded
    served = TestClient(init(model)).post(  # the app `mlflow models serve` runs, asked as a client would ask it
        "/invocations", json={"dataframe_records": [{"prompt": "a red car"}], "params": {"steps": 2}}
    )
    assert served.status_code == 400 and "image: LTX-Video image-to-video" in served.json()["message"]

    images = [_encoded(_image(0, size=32), "PNG"), _encoded(_image(1, size=32), "JPEG")]
    predicted = model.predict(pd.DataFrame({"prompt": ["a red car"] * 2, "image": images}), params={"steps": 2})
    first, second = (_frames(video) for video in predicted["video"])
    assert first.shape == second.shape == (9, 32, 32, 3)  # the logged sample size
    assert np.abs(first.astype(float) - second).mean() > 1  # the same prompt and seed: only the image differs


def test_a_text_to_video_model_refuses_an_image_column():
    rows = pd.DataFrame({"prompt": ["a red car", "a blue sky"], "image": [None, _encoded(_image(), "PNG")]})
    with pytest.raises(MlflowException, match=r"^image: LTX-Video \(ltx-video\) generates from text only.*row 1"):
        row_conditioning(get_family("ltx-video"), rows)
    assert row_conditioning(get_family("ltx-video"), rows.iloc[:1]) == [{}]  # an empty column is no image
