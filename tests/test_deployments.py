"""prefect.yaml against the flows: every preset validates against its flow's pydantic model, `prefect deploy --all`
as infra/worker-entrypoint.sh runs it registers them on a process work pool of a real server (idempotently), and `vidtune run` merges changes into a preset key by key (the GPU limit in real flows: test_finetune_flow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from vidtune.flows.config import ParamError
from vidtune.flows.deployments import load_deployments, load_flow, merge_run_parameters, validate_flow_parameters

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
EXPECTED = {"curate/default", "finetune/style", "finetune/full", "import-lora/default", "evaluate/default"}


def presets() -> dict[str, dict]:
    """{"finetune/style": its parameters, ...} as prefect.yaml declares them."""
    return {f"{load_flow(e['entrypoint']).name}/{e['name']}": e for e in load_deployments(ROOT / "prefect.yaml")}


def test_every_deployment_preset_validates_against_its_flow():
    deployments = presets()
    assert set(deployments) == EXPECTED
    for name, entry in deployments.items():
        validate_flow_parameters(load_flow(entry["entrypoint"]), entry["parameters"])  # raises, naming the field
        assert entry["work_pool"]["name"] == "vidtune", name  # the shared pool of `definitions:`


def test_the_style_preset_is_a_lora_with_a_trigger_word_from_raw_videos_and_full_trains_on_shards():
    from vidtune.flows.finetune import FinetuneParams

    style = FinetuneParams.model_validate(presets()["finetune/style"]["parameters"]["params"])
    assert style.training_type == "lora" and style.curate is not None and style.curate.captions.trigger
    assert style.data == style.curate.output  # the curate subflow's output is what trains
    assert style.validation.prompts and all(
        "{trigger}" in p for p in style.validation.prompts + style.evaluation.prompts
    )
    full = FinetuneParams.model_validate(presets()["finetune/full"]["parameters"]["params"])
    assert full.training_type == "full" and full.curate is None and full.data == style.curate.output


def test_a_wrong_key_or_value_is_refused_naming_the_field():
    flow, stored = load_flow("vidtune.flows.finetune.finetune"), presets()["finetune/style"]["parameters"]
    with pytest.raises(ParamError, match=r"params\.max_stepz: unknown parameter"):
        validate_flow_parameters(flow, merge_run_parameters(stored, ["max_stepz=5"], {"params"}))
    with pytest.raises(ParamError, match=r"params\.rank: Input should be greater than 0"):
        validate_flow_parameters(flow, merge_run_parameters(stored, ["rank=0"], {"params"}))
    with pytest.raises(ParamError, match=r"params: data \(/elsewhere\) must be curate\.output"):
        validate_flow_parameters(flow, merge_run_parameters(stored, ["data=/elsewhere"], {"params"}))
    with pytest.raises(ParamError, match="finetune has no parameter param"):
        validate_flow_parameters(flow, {"param": {}})


def test_run_changes_merge_into_the_preset_key_by_key():
    style = presets()["finetune/style"]["parameters"]
    merged = merge_run_parameters(style, ["max_steps=5", "curate.input=/videos", "mixed_precision=no"], {"params"})[
        "params"
    ]
    assert merged["max_steps"] == 5 and merged["curate"]["input"] == "/videos"
    assert (
        merged["curate"]["captions"] == style["params"]["curate"]["captions"]
        and merged["rank"] == style["params"]["rank"]
    )
    assert merged["mixed_precision"] == "no"  # YAML 1.1 would have made it False
    evaluate = presets()["evaluate/default"]["parameters"]
    merged = merge_run_parameters(evaluate, ["run=/runs/x", "inference_steps=4"], {"run", "params"})
    assert merged["run"] == "/runs/x" and merged["params"] == {**evaluate["params"], "inference_steps": 4}


def _start_worker(env: dict) -> str:
    """infra/worker-entrypoint.sh until its worker polls the pool (then stopped); returns what it printed."""
    process = subprocess.Popen(
        ["bash", str(ROOT / "infra" / "worker-entrypoint.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        for line in process.stdout:  # ends if the script exits first
            lines.append(line)
            if "started!" in line:  # prefect's "Worker 'ProcessWorker …' started!"
                break
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a slow graceful shutdown: the test has what it needs
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = "".join(lines)
    assert "started!" in output, output
    return output


@pytest.mark.slow
def test_worker_entrypoint_creates_the_pool_the_gpu_limit_and_the_deployments_and_is_idempotent(prefect_api):
    """What the compose worker runs on each start, against a real server: a missing pool and `gpu` limit are
    created, `prefect deploy --all` registers every deployment of prefect.yaml on the pool, and a restart changes
    nothing (an existing limit keeps its value)."""
    for stale in ("v2/concurrency_limits/gpu", "work_pools/vidtune"):  # earlier tests of this session made them
        httpx.delete(f"{prefect_api}/{stale}")
    env = os.environ | {
        "PREFECT_API_URL": prefect_api,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    _start_worker(env | {"VIDTUNE_GPU_SLOTS": "1"})
    pool = httpx.get(f"{prefect_api}/work_pools/vidtune").json()
    limit = httpx.get(f"{prefect_api}/v2/concurrency_limits/gpu").json()
    assert pool["type"] == "process" and limit["limit"] == 1
    stored = {}
    for name, entry in presets().items():
        stored[name] = httpx.get(f"{prefect_api}/deployments/name/{name}").json()
        assert stored[name]["work_pool_name"] == "vidtune" and stored[name]["entrypoint"] == entry["entrypoint"]
        assert stored[name]["parameters"] == json.loads(json.dumps(entry["parameters"])), name
        assert "params" in stored[name]["parameter_openapi_schema"]["properties"]  # the UI form

    again = _start_worker(env | {"VIDTUNE_GPU_SLOTS": "3"})  # a restart
    assert "Created work pool" not in again
    assert httpx.get(f"{prefect_api}/work_pools/vidtune").json()["id"] == pool["id"]
    assert httpx.get(f"{prefect_api}/v2/concurrency_limits/gpu").json() | {"updated": None} == limit | {
        "updated": None
    }  # kept: 1 slot
    for name in presets():
        assert httpx.get(f"{prefect_api}/deployments/name/{name}").json()["id"] == stored[name]["id"], name


def test_worker_setup_refuses_a_pool_no_deployment_uses_before_touching_the_server(capsys):
    from vidtune.flows.workpool import main

    assert main(["elsewhere", "1"]) == 2  # no server is configured here: it stops before asking one
    assert (
        "VIDTUNE_WORK_POOL='elsewhere', but prefect.yaml's deployments use the work pool(s) ['vidtune']"
        in capsys.readouterr().err
    )
    assert main(["vidtune", "0"]) == 2 and "GPU_SLOTS" in capsys.readouterr().err


def test_serve_against_a_configured_server_that_is_down_says_what_to_do(tmp_path):
    from tests.test_ui_path import free_port

    env = os.environ | {"PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    result = subprocess.run(
        [sys.executable, "-m", "vidtune.flows.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "does not answer" in result.stdout and "vidtune server start" in result.stdout
