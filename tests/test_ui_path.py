"""The Prefect UI path, for real, on loopback: `prefect server start` (SQLite) on a free port, `vidtune serve`
against it, `prefect deployment run finetune/style` with the preset plus tiny settings (what the UI's run form
sends), the run completes, and its model version is in the MLflow registry. Every process started is stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TEST_CLIPS
from tests.test_deployments import PREFECT, ROOT, presets
from vidtune.flows.config import deep_merge

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], what: str, timeout_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout_s:.0f} s; logs:\n" + "\n".join(p.read_text()[-3000:] for p in logs))


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own group (so its children go with it), output to `log`."""
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def tiny_wan(tmp_path) -> str:
    from vidtune.training.tiny_models import build_tiny_wan

    return str(build_tiny_wan(tmp_path / "wan"))


def test_prefect_deployment_run_through_vidtune_serve_registers_a_model_version(
    tmp_path, raw_videos, tiny_clip, tiny_wan, vidtune
):
    from vidtune.training.tiny_models import TINY_CLIP

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "VIDTUNE_HOME": str(tmp_path / "vidtune-home"),
    }
    logs = [tmp_path / "server.log", tmp_path / "serve.log"]
    processes = []
    try:
        processes.append(start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, logs[0]))
        wait_for(lambda: httpx.get(f"{api}/health").status_code == 200, "the Prefect server answers", 180, logs)
        processes.append(start([sys.executable, "-m", "vidtune.flows.cli", "serve"], env, logs[1]))
        wait_for(
            lambda: httpx.get(f"{api}/deployments/name/finetune/style").status_code == 200,
            "vidtune serve registers finetune/style",
            180,
            logs,
        )

        tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        tiny = {
            "curate": {
                "input": str(raw_videos[0]),
                "output": str(tmp_path / "dataset"),
                "clips": TEST_CLIPS,
                "scenes": {"min_clip_s": 1.2},
                "scores": {"clip_model": TINY_CLIP, "clip_pretrained": str(tiny_clip)},
                "filters": {"dedup_threshold": None},
            },
            "model": tiny_wan,
            "out": str(tmp_path / "run"),
            "rank": 4,
            "warmup_steps": 0,
            "gradient_accumulation_steps": 1,
            "checkpoint_every": 2,
            "mixed_precision": "no",
            "precompute": {"frame_buckets": [9]},
            "tracking_uri": tracking_uri,
            "validation": {"every": 4, "inference_steps": 2},
            "evaluation": {"inference_steps": 2, "clip_model": TINY_CLIP, "clip_pretrained": str(tiny_clip)},
        }
        params = deep_merge(
            presets()["finetune/style"]["parameters"]["params"], tiny
        )  # the preset, as the UI form shows it, edited
        run = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "finetune/style",
                "--params",
                json.dumps({"params": params}),
                "--param",  # a common key as a top-level parameter, beside the nested form
                "max_steps=4",
                "--watch",
                "--watch-timeout",
                "540",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0 and "Completed" in run.stdout, (
            run.stdout + run.stderr + "".join(p.read_text()[-4000:] for p in logs)
        )

        client = MlflowClient(tracking_uri)
        (version,) = client.search_model_versions("name='vidtune-style'")
        assert (
            str(client.get_model_version_by_alias("vidtune-style", "challenger").version) == str(version.version) == "1"
        )
        assert (
            version.tags["vidtune.run_dir"] == str((tmp_path / "run").resolve())
            and Path(tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        )

        job = json.loads((tmp_path / "run" / "train_job.json").read_text())
        trigger = params["curate"]["captions"]["trigger"]
        assert (
            job["params"]["validation"]["prompts"][0] == f"a city street at night, {trigger}"
        )  # the preset's {trigger} filled in

        runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}).json()}
        assert sorted(flows[r["flow_id"]] for r in runs) == [
            "curate",
            "evaluate",
            "finetune",
            "register",
        ]  # one run, three subflows
        assert all(r["state_type"] == "COMPLETED" for r in runs)
        names = {flows[r["flow_id"]]: r["name"] for r in runs}  # named for what they do, with the run's short id
        assert names["finetune"].startswith("finetune-vidtune-style-") and names["curate"].startswith("curate-dataset-")
        assert names["evaluate"].startswith("evaluate-run-") and names["register"].startswith("register-vidtune-style-")
        assert job["params"]["max_steps"] == 4  # from --param max_steps=4
        artifacts = {a["key"]: a for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
        assert {"curate-summary", "finetune-summary", "evaluation", "promotion-gate"} <= set(artifacts)
        table = artifacts["evaluation-metrics"]
        assert table["type"] == "table" and {"metric": "val_loss"}.items() <= json.loads(table["data"])[0].items()
        # link artifacts (Prefect stores them as markdown links): the logged model's and the run's MLflow folders
        assert artifacts["model-version"]["data"].startswith("[models:/vidtune-style/1](file://")
        assert artifacts["mlflow-run"]["data"].startswith(f"[MLflow run {version.run_id}](file://")
        assert (
            artifacts["train-progress"]["data"]
            == artifacts["precompute-progress"]["data"]
            == artifacts["curating-progress"]["data"]
            == 100
        )
        assert (
            "| val_loss |" in artifacts["finetune-summary"]["data"]
            and "models:/vidtune-style/1" in artifacts["finetune-summary"]["data"]
        )
        assert (
            httpx.get(f"{api}/v2/concurrency_limits/gpu").json()["limit"] == 1
        )  # the run created the GPU limit it held

        # `vidtune run`: another deployment's preset plus changes, key by key (the run just trained, evaluated again;
        # only created here: a served run executing was shown above)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        sets = [
            f"run={tmp_path / 'run'}",
            "inference_steps=2",
            f"clip_model={TINY_CLIP}",
            f"clip_pretrained={tiny_clip}",
            "prompts=[a red car]",
        ]
        with temporary_settings(updates={PREFECT_API_URL: api}):
            code, out = vidtune("run", "evaluate/default", *(f"--set={s}" for s in sets))
        assert code == 0 and f"127.0.0.1:{port}/runs/flow-run/" in out, out
        (created,) = [
            r
            for r in httpx.post(f"{api}/flow_runs/filter", json={}).json()
            if r["deployment_id"] and "run" in r["parameters"]
        ]
        assert created["parameters"]["run"] == str(tmp_path / "run")
        assert created["parameters"]["params"] == {
            "prompts": ["a red car"],
            "inference_steps": 2,
            "clip_model": TINY_CLIP,
            "clip_pretrained": str(tiny_clip),
        }
    finally:
        for process in reversed(processes):
            stop(process)
    assert all(p.poll() is not None for p in processes)
