"""Shared fixtures: one Prefect test harness per session, generated raw videos with ground truth, and one
curated dataset that several tests read."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import vidtune.tasks  # noqa: F401  (Prefect defaults before prefect is imported)
from tests.bad_inputs import make_bad_inputs

# MLflow runs and other VIDTUNE_HOME state go to a throwaway folder, never the developer's ~/.vidtune.
os.environ["VIDTUNE_HOME"] = tempfile.mkdtemp(prefix="vidtune-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# CLI subprocesses run in-process against the session's test server; the local server and the warm worker
# have their own tests (test_server.py), which turn them back on.
os.environ["VIDTUNE_WORKER"] = "0"
os.environ["VIDTUNE_LOCAL_SERVER"] = "0"

# Small clips keep the suite fast on 2 CPU cores.
TEST_CLIPS = {"width": 64, "height": 64, "fps": 8}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """Random open_clip weights for the bundled tiny config, saved to a file (loaded with pretrained=PATH)."""
    from vidtune.training.tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip.safetensors")


@pytest.fixture(scope="session")
def make_params(tiny_clip):
    """CurateParams for tests: small clips, the tiny CLIP model, and any overrides."""
    from vidtune.flows.curate import CurateParams
    from vidtune.training.tiny_models import TINY_CLIP

    def make(input_path, output, **overrides) -> CurateParams:
        values = {
            "input": str(input_path),
            "output": str(output),
            "clips": TEST_CLIPS,
            "workers": 2,
            "scores": {"clip_model": TINY_CLIP, "clip_pretrained": str(tiny_clip)},
        }
        for key, value in overrides.items():
            values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
        return CurateParams.model_validate(values)

    return make


@pytest.fixture
def vidtune(monkeypatch):
    """`vidtune ARGS` in this process: (exit code, what it printed). A subprocess would spend ~15 s importing
    (that path, through the console script: test_cli). Only stdout is taken: Prefect's log handler keeps the
    stderr it first wrote to, so a stream swapped in for one call (capsys, typer's CliRunner) breaks later tests."""
    import io
    from contextlib import redirect_stdout

    from typer.main import get_command

    from vidtune.flows.cli import app

    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str]:
        with redirect_stdout(io.StringIO()) as out:
            code = get_command(app).main(list(args), prog_name="vidtune", standalone_mode=False)
        return code or 0, out.getvalue()

    return run


@pytest.fixture(scope="session")
def cli_sets(tiny_clip) -> list[str]:
    """The same test settings as --set arguments, for CLI subprocesses."""
    from vidtune.training.tiny_models import TINY_CLIP

    sets = {
        **{f"clips.{k}": v for k, v in TEST_CLIPS.items()},
        "scores.clip_model": TINY_CLIP,
        "scores.clip_pretrained": tiny_clip,
    }
    return [f"--set={k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real Prefect API (temporary SQLite database) for the whole session; returns its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def raw_videos(tmp_path_factory):
    """The standard messy synthetic set (with ground truth), generated once."""
    from vidtune.tasks.synthetic_videos import make_raw_video_set

    folder = tmp_path_factory.mktemp("raw")
    return folder, make_raw_video_set(folder, seed=1, seconds=5.0)


@pytest.fixture(scope="session")
def raw_with_bad_inputs(tmp_path_factory, raw_videos):
    """The synthetic set plus every kind of bad input; returns (folder, videos, expected outcome per bad file)."""
    folder, videos = raw_videos
    mixed = tmp_path_factory.mktemp("mixed")
    for video in videos:
        shutil.copy(video.path, mixed / video.path.name)
    expected = make_bad_inputs(mixed / "zz_bad_inputs", good=videos[0].path)  # sorts after the good ones
    return mixed, videos, expected


@pytest.fixture(scope="session")
def curated(prefect_api, raw_with_bad_inputs, tmp_path_factory, make_params):
    """One real curate flow run over good and bad inputs; returns (output folder, summary, inputs)."""
    from vidtune.flows.curate import curate

    folder, videos, expected = raw_with_bad_inputs
    output = tmp_path_factory.mktemp("dataset")
    summary = curate(make_params(folder, output))
    return output, summary, (folder, videos, expected)


@pytest.fixture
def as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def video_files(folder: Path) -> list[Path]:
    from vidtune.tasks.discover import VIDEO_EXTENSIONS

    return sorted(
        p for p in folder.rglob("*") if (p.is_symlink() or p.is_file()) and p.suffix.lower() in VIDEO_EXTENSIONS
    )
