"""The `finetune` flow on real curated shards with a tiny Wan, under the real Prefect harness and MLflow on
SQLite: the loss goes down, the adapter loads into a fresh pipeline, two accelerate processes train on disjoint
clips, and bad data or settings are refused before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import av
import pytest
import torch
from mlflow.tracking import MlflowClient

from vidtune.training.data import cache_shards, make_stream
from vidtune.training.families import get_family
from vidtune.training.shard_index import index_shards
from vidtune.training.trainer import batch_loss

BUCKETS = [9, 17]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory) -> str:
    from vidtune.training.tiny_models import build_tiny_wan

    return str(build_tiny_wan(tmp_path_factory.mktemp("wan") / "model"))


def finetune_params(curated, model, tmp_path, **overrides):
    from vidtune.flows.finetune import FinetuneParams

    output, _, _ = curated
    values = {
        "run_evaluation": False,
        "run_registration": False,
        "data": str(output),
        "model": model,
        "out": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "precompute": {"frame_buckets": BUCKETS},
        "rank": 4,
        "learning_rate": 5e-3,
        "max_steps": 30,
        "mixed_precision": "no",
        "checkpoint_every": 10,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "validation": {"prompts": ["a red car in vidtune style"], "every": 15, "inference_steps": 2},
        **overrides,
    }
    return FinetuneParams.model_validate(values)


def fixed_noise_loss(pipe, shards: list[str]) -> float:
    """Mean loss over the cached clips with the same timesteps and noise for every model compared."""
    family, total = get_family("wan"), []
    for batch, _ in zip(make_stream("cache", shards, BUCKETS, batch_size=1, seed=0), range(12)):
        torch.manual_seed(0)
        with torch.no_grad():
            total.append(batch_loss(family, pipe, pipe.transformer, batch, torch.float32).item())
    return sum(total) / len(total)


def test_lora_finetune_lowers_the_loss_and_the_adapter_loads_into_a_fresh_pipeline(
    prefect_api, curated, wan_model, tmp_path
):
    from vidtune.flows.finetune import finetune

    summary = finetune(finetune_params(curated, wan_model, tmp_path, holdout_clips=0))
    assert summary["family"] == "wan" and summary["steps"] == 30
    adapter = tmp_path / "run" / "adapter"
    assert summary["weights"] == str(adapter)

    family = get_family("wan")
    shards = cache_shards(next((tmp_path / "cache").iterdir()))
    base = family.load_pipeline(wan_model)
    tuned = family.load_pipeline(wan_model)
    tuned.load_lora_weights(adapter)  # the path users take
    assert tuned.transformer.peft_config["default_0"].r == 4  # rank/alpha travel in the safetensors metadata
    assert fixed_noise_loss(tuned, shards) < fixed_noise_loss(base, shards)
    video = tuned(
        prompt="a red car",
        num_frames=9,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 9, 64, 64, 3)

    info = json.loads((adapter / "vidtune.json").read_text())
    assert info["rank"] == 4 and info["alpha"] == 4 and info["base_model"] == wan_model and info["steps"] == 30

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert (
        run.info.status == "FINISHED" and run.data.params["training_type"] == "lora" and run.data.params["rank"] == "4"
    )
    assert {"loss", "lr", "grad_norm", "samples_per_s", "peak_memory_mb"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 30
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples/step-000015")}
    assert {"samples/step-000015/sample-00.mp4", "samples/step-000015/sample-00.gif"} <= artifacts
    assert os.path.exists(run.info.artifact_uri.removeprefix("file://"))  # where we said, not ./mlruns
    assert not os.path.exists("mlruns")

    for step in (15, 30):
        with av.open(str(tmp_path / "run" / "samples" / f"step-{step:06d}" / "sample-00.mp4")) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "checkpoint-000010",
        "checkpoint-000020",
        "checkpoint-000030",
    ]


@pytest.mark.slow
def test_two_accelerate_processes_train_on_disjoint_clips_and_write_one_adapter(
    prefect_api, curated, wan_model, tmp_path
):
    """Also: a bad sample on rank 1 stops both ranks at the step it is in, with a checkpoint of the step before
    (both ranks' RNG states) and a message naming the rank, its bucket and the error; the resumed run trains the
    rest of the one global order as an uninterrupted run would."""
    from vidtune.flows.finetune import finetune
    from vidtune.training.trainer import StepFailed

    # With block swap (offload=blocks): DDP leaves the swapped weights alone, and a resume swaps as the first run did.
    settings = {"num_processes": 2, "max_steps": 6, "checkpoint_every": 3, "validation": {}}
    settings |= {"offload": "blocks", "blocks_to_swap": 1}
    finetune(finetune_params(curated, wan_model, tmp_path, prepare_only=True, **settings))
    run = tmp_path / "run"
    job = json.loads((run / "train_job.json").read_text())
    assert (job["params"]["offload"], job["params"]["blocks_to_swap"]) == ("blocks", 1)

    def order(seed: int) -> list:
        return list(
            islice(
                make_stream(
                    "cache",
                    job["shards"],
                    BUCKETS,
                    batch_size=1,
                    seed=seed,
                    exclude=frozenset(job["holdout_clip_ids"]),
                    clip_ids=set(job["train_clip_ids"]),
                ).order.batches(),
                12,
            )
        )

    def unread_until_9(batches: list) -> bool:
        """Batch 9 (rank 1's in step 5, not a checkpoint's) is of a clip no earlier batch trains: the one made
        unreadable, so that step 5 fails and step 4's checkpoint is the failure's own."""
        return not {c for b in batches[:9] for c in b.clip_ids} & set(batches[9].clip_ids)

    # A seed whose first batch is of one bucket on both ranks: with one RNG for every rank, both would draw the
    # same first noise level (the draws before it have the same shape).
    orders = {s: order(s) for s in range(100)}
    seed = next(s for s, o in orders.items() if o[0].bucket == o[1].bucket and unread_until_9(o))
    batches, clip = orders[seed], orders[seed][9].clip_ids[0]
    shard = next(Path(s) for s in job["shards"] if clip in index_shards([s]))
    original = shard.read_bytes()
    _rewrite_member(shard, f"{clip}.latents.safetensors", _fewer_latent_channels)  # a sample the model cannot take
    try:
        with pytest.raises(StepFailed) as failed:
            finetune(finetune_params(curated, wan_model, tmp_path, seed=seed, **settings))
    finally:
        shard.write_bytes(original)
    message = str(failed.value)
    assert f"step 5 failed on rank 1 (rank 1: bucket {batches[9].bucket}, RuntimeError" in message
    kept = run / "checkpoints" / "checkpoint-000004"
    assert f"Resume from {kept} with resume=latest" in message
    assert sorted(p.name for p in kept.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    for rank in (0, 1):  # both ranks' records end at the checkpoint
        record = json.loads((run / "trained_clips" / f"rank-{rank:02d}.json").read_text())
        assert record["micro_batches"] == len(record["buckets"]) == 4
    summary = finetune(finetune_params(curated, wan_model, tmp_path, seed=seed, resume="latest", **settings))
    records = [json.loads((run / "trained_clips" / f"rank-{r:02d}.json").read_text()) for r in (0, 1)]
    assert records[0]["last_resumed_at_step"] == 4
    seen = [set(record["clip_ids"]) for record in records]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # Each rank trained its share of the one global order (batch g to rank g % 2), at noise levels of its own.
    for rank, record in enumerate(records):
        assert record["clip_ids"] == [c for b in batches[rank::2] for c in b.clip_ids]
        assert record["buckets"] == [b.bucket for b in batches[rank::2]]
    assert len(records[0]["timesteps"]) == 6 and records[0]["timesteps"][0] != records[1]["timesteps"][0]
    assert summary["steps"] == 6 and (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-000006").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert json.loads((run / "adapter" / "vidtune.json").read_text())["steps"] == 6
    # Both ranks measured their share of the held-out clips at each checkpoint; rank 0 gathered every draw.
    curve = json.loads((run / "best" / "curve.json").read_text())
    draws = job["params"]["validation"]["heldout_draws"] * len(job["holdout_clip_ids"])
    assert len(job["holdout_clip_ids"]) >= 2 and {s: p["draws"] for s, p in curve.items()} == {"3": draws, "6": draws}


def _rewrite_member(shard: Path, name: str, change) -> None:
    """`shard` with member `name`'s bytes replaced by `change(bytes)` (the other members as they were)."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info, change(data) if info.name == name else data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fewer_latent_channels(data: bytes) -> bytes:
    from safetensors.torch import load, save

    ((name, latents),) = load(data).items()
    return save({name: latents[:-2].contiguous()})  # two channels short: the patch embedding refuses it


def test_prepare_only_writes_the_job_that_training_launch_runs(prefect_api, curated, wan_model, tmp_path):
    from vidtune.flows.finetune import finetune

    validation = {"prompts": ["a red car, {trigger}"], "every": 4, "inference_steps": 2}
    summary = finetune(
        finetune_params(
            curated, wan_model, tmp_path, max_steps=4, checkpoint_every=2, validation=validation, prepare_only=True
        )
    )
    run = tmp_path / "run"
    assert summary["prepared"] and (run / "train_job.json").is_file() and not (run / "adapter").exists()
    job = json.loads((run / "train_job.json").read_text())
    assert job["params"]["validation"]["prompts"] == [
        "a red car"
    ]  # {trigger}: this dataset has none, so no dangling comma
    launched = subprocess.run(
        [sys.executable, "-m", "vidtune.training.launch", str(run / "train_job.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert (
        json.loads((run / "train_progress.json").read_text())["step"]
        == json.loads((run / "train_result.json").read_text())["steps"]
        == 4
    )
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def weightless_model(wan_model, tmp_path_factory):
    """Only model_index.json: the family is detectable, but loading any weights would fail."""
    folder = tmp_path_factory.mktemp("weightless")
    shutil.copy(os.path.join(wan_model, "model_index.json"), folder)
    return str(folder)


def test_missing_or_empty_data_is_refused_before_the_model_loads(prefect_api, weightless_model, tmp_path, vidtune):
    code, out = vidtune(
        "finetune", "--data", str(tmp_path / "nope"), "--model", weightless_model, "--out", str(tmp_path / "r")
    )
    assert code == 2 and "does not exist; curate raw videos into it first" in out
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    code, out = vidtune(
        "finetune", "--data", str(tmp_path / "empty"), "--model", weightless_model, "--out", str(tmp_path / "r")
    )
    assert code == 2 and "no shards in" in out


def test_no_clip_fitting_a_bucket_names_the_buckets_and_the_clips(prefect_api, curated, weightless_model, tmp_path):
    from vidtune.flows.finetune import finetune
    from vidtune.training.data import DatasetError

    with pytest.raises(
        DatasetError, match=r"no clip fits a frame bucket of wan \(81 frames\): the \d+ clips have \d+-\d+ frames"
    ):
        finetune(finetune_params(curated, weightless_model, tmp_path, precompute={"frame_buckets": [81]}))


def test_clips_larger_than_the_models_rope_table_are_refused_naming_the_setting(
    prefect_api, curated, wan_model, tmp_path
):
    """What a published model with a short RoPE table (or too-large clips) would hit deep inside attention as
    `RuntimeError: shape '[1, 1, 52, -1]' is invalid` is a message before anything loads."""
    from vidtune.flows.finetune import finetune

    model = shutil.copytree(wan_model, tmp_path / "model")
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "rope_max_seq_len": 3}))
    with pytest.raises(
        ValueError,
        match=r"clips.height: 64 pixels make 4 latent patches, more than this model's RoPE table holds \(transformer rope_max_seq_len = 3: at most 48 pixels\); curate smaller clips",
    ):
        finetune(finetune_params(curated, str(model), tmp_path, precompute={"frame_buckets": [9]}))
    assert not (tmp_path / "cache").exists()  # refused before precompute


def test_experts_for_a_model_with_one_denoiser_is_refused_naming_the_field(prefect_api, curated, wan_model, tmp_path):
    from vidtune.flows.finetune import finetune

    with pytest.raises(
        ValueError, match=r"experts: .* has one denoiser; experts \(high, low, both\) is for two-expert"
    ):
        finetune(finetune_params(curated, wan_model, tmp_path, experts="high"))
    assert not (tmp_path / "cache").exists()  # refused before precompute


def test_an_evaluation_clip_that_cannot_load_is_refused_before_training(prefect_api, curated, wan_model, tmp_path):
    """Offline, the default CLIP weights cannot download: said before precompute, naming the settings and the fix,
    not as a download traceback after training."""
    from vidtune.flows.finetune import finetune

    missing = str(tmp_path / "clip.safetensors")
    params = finetune_params(curated, wan_model, tmp_path, run_evaluation=True, evaluation={"clip_pretrained": missing})
    with pytest.raises(
        ValueError,
        match=r"evaluation.clip_model/evaluation.clip_pretrained: cannot load open_clip 'ViT-B-32' with .*clip.safetensors.*"
        r"--set evaluation.clip_pretrained=PATH.*--set evaluation.clip_model=null",
    ):
        finetune(params)
    assert not (tmp_path / "cache").exists()  # refused before precompute


def test_invalid_settings_are_rejected_up_front_naming_the_field(tmp_path, vidtune):
    from vidtune.flows.config import ParamError, build_params
    from vidtune.flows.finetune import FinetuneParams

    code, out = vidtune(
        "finetune",
        "--data",
        str(tmp_path),
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
        "--set",
        "rank=0",
        "--set",
        "max_steps=0",
    )
    assert code == 2
    assert "rank: Input should be greater than 0" in out and "max_steps: Input should be greater than 0" in out

    base = {"data": str(tmp_path), "model": str(tmp_path), "out": str(tmp_path / "r")}
    for sets, message in (
        (["training_type=full", "fp8_storage=true"], "fp8: only with training_type=lora"),
        (["alpha=-1"], "alpha: Input should be greater than 0"),
        (["data_source=frames"], "data_source: Input should be 'cache' or 'shards'"),
    ):
        with pytest.raises(ParamError, match=message):
            build_params(FinetuneParams, base=base, overrides=sets)
    if not torch.cuda.is_available():
        with pytest.raises(ParamError, match="mixed_precision: fp16 needs a GPU"):
            build_params(FinetuneParams, base=base, overrides=["mixed_precision=fp16"])


def test_finetune_help_and_parameter_list(vidtune):
    _, help_text = vidtune("finetune", "--help")
    assert "--data" in help_text and "resume=latest" in help_text
    _, listing = vidtune("finetune", "--list-params")
    for name in (
        "training_type",
        "rank",
        "alpha",
        "learning_rate",
        "batch_size",
        "max_steps",
        "gradient_checkpointing",
        "mixed_precision",
        "resume",
    ):
        assert name in listing


def _task_span(api: str, flow_run_id, name: str) -> tuple[float, float]:
    from datetime import datetime

    import httpx

    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "task_runs": {"name": {"like_": name}}}
    (run,) = [r for r in httpx.post(f"{api}/task_runs/filter", json=body).json() if r["name"].startswith(f"{name}-")]
    return tuple(datetime.fromisoformat(run[key]).timestamp() for key in ("start_time", "end_time"))


def test_gpu_runs_queue_on_the_limit_and_gpu_limit_null_takes_none(prefect_api, curated, wan_model, tmp_path, caplog):
    """Two finetune runs started together train one after the other (the second says it waits); an evaluate run on
    its own waits for the slot too; with gpu_limit=null it runs while the slot is taken."""
    import threading
    import time

    from prefect.concurrency.sync import concurrency

    from vidtune.flows.evaluate import EvaluateParams, evaluate
    from vidtune.flows.finetune import finetune

    limit = "gpu-queue-test"
    states = {}

    def run(name: str) -> None:
        params = finetune_params(
            curated, wan_model, tmp_path / name, max_steps=2, gpu_limit=limit, validation={"prompts": []}
        )
        states[name] = finetune(params, return_state=True)

    def logged(text: str) -> dict[str, list[str]]:
        return {
            r.flow_run_name: r.getMessage()
            for r in caplog.records
            if text in r.getMessage() and hasattr(r, "flow_run_name")
        }

    caplog.set_level("INFO")
    threads = {name: threading.Thread(target=run, args=(name,)) for name in ("first", "second")}
    threads["first"].start()
    deadline = time.monotonic() + 120
    while not logged(f"holding a slot of '{limit}'") and time.monotonic() < deadline:
        time.sleep(0.2)
    threads["second"].start()
    for thread in threads.values():
        thread.join(600)
    assert all(state.is_completed() for state in states.values()), states
    first, second = (_task_span(prefect_api, states[n].state_details.flow_run_id, "train") for n in ("first", "second"))
    assert first[1] <= second[0]  # the second trained only after the first had finished
    waiting = logged(f"waiting for a slot of concurrency limit '{limit}' (1 of 1 in use by other runs)")
    assert len(waiting) == 1  # only the second run waited

    evaluation = {"prompts": ["a red car"], "inference_steps": 1, "clip_model": None}
    result = {}
    with concurrency(limit, occupy=1):  # another GPU job holds the only slot
        queued = threading.Thread(
            target=lambda: result.update(
                slot=evaluate(str(tmp_path / "first" / "run"), EvaluateParams(**evaluation, gpu_limit=limit))
            )
        )
        queued.start()
        deadline = time.monotonic() + 120
        while len(logged(f"waiting for a slot of concurrency limit '{limit}'")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(logged(f"waiting for a slot of concurrency limit '{limit}'")) == 2  # the queued evaluate waits too
        free = evaluate(str(tmp_path / "first" / "run"), EvaluateParams(**evaluation, gpu_limit=None))  # takes no slot
        assert free["val_loss_adapted"] > 0 and queued.is_alive() and "slot" not in result
    queued.join(300)
    assert result["slot"]["val_loss_adapted"] == pytest.approx(free["val_loss_adapted"])


def test_a_retried_finetune_run_resumes_from_its_last_checkpoint(
    prefect_api, curated, wan_model, tmp_path, monkeypatch
):
    """What Retry in the UI does (the same flow run, run_count 2): the failed attempt's checkpoints are continued
    instead of refused. The first attempt fails after training, where a crash costs the most."""
    import vidtune.flows.finetune as module

    real, attempts = module.publish_summary_task, []

    def fails_the_first_time(summary):
        attempts.append(summary["steps"])
        if len(attempts) == 1:
            raise RuntimeError("the machine went away")
        return real(summary)

    monkeypatch.setattr(module, "publish_summary_task", fails_the_first_time)
    params = finetune_params(curated, wan_model, tmp_path, max_steps=4, checkpoint_every=2, validation={"prompts": []})
    result = module.finetune.with_options(retries=1, retry_delay_seconds=0)(params)
    assert attempts == [4, 4] and result["steps"] == 4  # the retry started from checkpoint-000004: no step twice
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
    ]
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()]
    )
    assert len(runs) == 1  # and it went on in the same MLflow run


def test_common_keys_as_top_level_parameters_replace_the_nested_ones(curated, wan_model, tmp_path):
    from vidtune.flows.finetune import with_top_level

    params = finetune_params(curated, wan_model, tmp_path)
    changed = with_top_level(params, {"max_steps": 7, "name": "other", "rank": None, "learning_rate": 1e-4})
    assert (changed.max_steps, changed.registry.name, changed.rank, changed.learning_rate) == (7, "other", 4, 1e-4)
    with pytest.raises(ValueError, match=r"input: sets params\.curate\.input, but params\.curate is null"):
        with_top_level(params, {"input": "/data/raw"})
    with pytest.raises(ValueError, match="max_steps"):
        with_top_level(params, {"max_steps": 0})
