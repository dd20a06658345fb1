"""Evaluate, register and generate with real MLflow on SQLite, the real Prefect harness and tiny models: the gate
promotes a better adapter and never a worse one, registration is idempotent and safe when two runs register at
once, and `generate` renders from `models:/NAME@champion`."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from vidtune.evaluation.registry import CHALLENGER, CHAMPION, RegistryError, decide, register_run

BUCKETS = [9, 17]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory) -> str:
    from vidtune.training.tiny_models import build_tiny_wan

    return str(build_tiny_wan(tmp_path_factory.mktemp("wan") / "model"))


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory) -> str:
    """A TorchScript video feature extractor with the I3D interface ((n, 3, t, h, w) in [-1, 1] -> (n, d))."""

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))

    path = tmp_path_factory.mktemp("i3d") / "i3d.pt"
    torch.jit.script(Features()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def runs(prefect_api, curated, wan_model, tiny_clip, tiny_i3d, tmp_path_factory):
    """Two finished, evaluated runs: `strong` (30 steps) and `weak` (3 tiny steps); both beat the base a little."""
    from vidtune.flows.finetune import FinetuneParams, finetune
    from vidtune.training.tiny_models import TINY_CLIP

    output, _, _ = curated
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, steps, lr in (("strong", 30, 5e-3), ("weak", 3, 2e-4)):
        params = FinetuneParams.model_validate(
            {
                "data": str(output),
                "model": wan_model,
                "out": str(root / name),
                "cache_dir": str(root / "cache"),
                "precompute": {"frame_buckets": BUCKETS},
                "rank": 4,
                "learning_rate": lr,
                "max_steps": steps,
                "mixed_precision": "no",
                "checkpoint_every": 100,
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "run_registration": False,
                "holdout_clips": 3,
                "evaluation": {
                    "prompts": ["a red car", "a blue sky"],
                    "inference_steps": 2,
                    "clip_model": TINY_CLIP,
                    "clip_pretrained": str(tiny_clip),
                    "i3d_path": tiny_i3d,
                },
            }
        )
        made[name] = finetune(params)
    return root, made


def test_evaluation_compares_base_and_adapted_on_held_out_clips(runs, prefect_api):
    root, made = runs
    metrics = made["strong"]["metrics"]
    for name in ("val_loss", "clip_alignment", "frame_consistency", "temporal_flicker", "motion", "fvd"):
        assert np.isfinite(metrics[f"{name}_base"]) and np.isfinite(metrics[f"{name}_adapted"]), name
    assert metrics["heldout_clips"] >= 3 and metrics["val_loss_adapted"] < metrics["val_loss_base"]
    evaluation = root / "strong" / "evaluation"
    from PIL import Image

    sheet = Image.open(evaluation / "contact_sheet.png")
    assert sheet.size[1] == 4 * 64  # rows: (base, adapted) x 2 prompts, 64-pixel frames
    for label in ("base-00", "adapted-01"):
        with av.open(str(evaluation / "samples" / f"{label}.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9
    report = (evaluation / "report.md").read_text()
    assert "| val_loss |" in report and "contact_sheet.png" in report
    assert "first_frame_psnr" not in report and not any("first_frame" in key for key in metrics)  # image-to-video only
    import httpx

    body = {"artifacts": {"key": {"any_": ["evaluation"]}}, "limit": 50, "offset": 0, "sort": "CREATED_DESC"}
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", json=body).json()  # the same table, as a Prefect artifact
    assert any("| val_loss |" in a["data"] and str(root / "strong") in a["data"] for a in artifacts)
    # held-out clips were never trained on
    job = json.loads((root / "strong" / "train_job.json").read_text())
    trained = set(json.loads((root / "strong" / "trained_clips" / "rank-00.json").read_text())["clip_ids"])
    assert job["holdout_clip_ids"] and not trained & set(job["holdout_clip_ids"])


def test_gate_decisions():
    better = {
        "val_loss_base": 2.0,
        "val_loss_adapted": 1.5,
        "clip_alignment_base": 0.30,
        "clip_alignment_adapted": 0.29,
    }
    assert decide(better, None, clip_tolerance=0.02).promote
    assert not decide({**better, "val_loss_adapted": 2.1}, None, 0.02).promote  # worse than the base
    assert not decide({**better, "clip_alignment_adapted": 0.27}, None, 0.02).promote  # alignment dropped too far
    assert not decide(better, {"vidtune.val_loss_gain": "0.5", "version": "3"}, 0.02).promote  # champion gained more
    assert decide(better, {"vidtune.val_loss_gain": "0.1", "version": "3"}, 0.02).promote
    assert not decide(None, None, 0.02).promote  # never evaluated: registered, not promoted


def test_a_better_adapter_is_promoted_a_worse_one_never_and_registering_twice_adds_nothing(runs):
    root, made = runs
    uri = f"sqlite:///{root}/mlflow.db"
    weak = register_run(root / "weak", "style-a", uri)
    assert weak.decision.promote and set(weak.aliases) == {CHALLENGER, CHAMPION}
    strong = register_run(root / "strong", "style-a", uri)
    assert strong.decision.promote and set(strong.aliases) == {CHALLENGER, CHAMPION}
    over_weak = strong.decision.checks[-1]  # the weak champion, loaded from the registry, scored on strong's draws
    assert over_weak["check"] == f"beats champion v{weak.version}" and over_weak["interval"][0] > 0
    assert "champion scored now with the same draws" in over_weak["data"]
    again = register_run(root / "weak", "style-a", uri)  # a retried task, or a rerun: no new version
    assert not again.created and again.version == weak.version and not again.decision.promote
    assert set(again.aliases) == set()  # challenger stays on the newest version
    assert "beats champion" in json.dumps(again.decision.checks)

    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'style-a'")) == 2
    assert str(client.get_model_version_by_alias("style-a", CHAMPION).version) == strong.version
    gate = json.loads((root / "strong" / "evaluation" / "gate.json").read_text())
    assert gate["promote"] and gate["version"] == strong.version
    run = client.get_run(made["strong"]["mlflow_run_id"])
    assert run.data.tags["vidtune.gate"] == "promoted to champion"
    assert (
        run.data.metrics["eval_val_loss_adapted"] < run.data.metrics["eval_val_loss_base"]
    )  # metrics and samples on the run
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/contact_sheet.png",
        "evaluation/samples",
    }


def test_a_weaker_adapter_after_a_stronger_champion_is_a_new_version_and_stays_challenger(runs):
    root, made = runs
    uri = f"sqlite:///{root}/mlflow.db"
    assert made["weak"]["metrics"]["val_loss_adapted"] > made["strong"]["metrics"]["val_loss_adapted"]
    strong = register_run(root / "strong", "style-g", uri)
    weak = register_run(root / "weak", "style-g", uri)  # other weights, registered later
    assert weak.created and int(weak.version) == int(strong.version) + 1 and not weak.decision.promote
    assert weak.aliases == [CHALLENGER] and set(strong.aliases) == {CHALLENGER, CHAMPION}
    failed = [c["check"] for c in weak.decision.checks if not c["passed"]]
    assert failed == [f"beats champion v{strong.version}"]  # it beats the base, just not the champion
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("style-g", CHAMPION).version) == strong.version
    assert str(client.get_model_version_by_alias("style-g", CHALLENGER).version) == weak.version
    assert client.get_model_version("style-g", weak.version).tags["vidtune.gate"].startswith("kept as challenger")


def test_a_challenger_within_noise_of_the_champion_is_not_promoted_both_scored_on_its_draws(runs, tmp_path):
    """The strong run's weights perturbed far below the interval (a rerun that changed nothing): it beats the base,
    but the champion, loaded from the registry and scored now on the challenger's held-out draws, is as good."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, made = runs
    uri = f"sqlite:///{root}/mlflow.db"
    copy = tmp_path / "rerun"
    shutil.copytree(root / "strong", copy)
    weights = copy / "adapter" / "pytorch_lora_weights.safetensors"
    generator = torch.Generator().manual_seed(0)
    state = {
        k: v + 1e-6 * v.abs().mean() * torch.randn(v.shape, generator=generator) for k, v in load_file(weights).items()
    }
    save_file(state, str(weights))
    champion = register_run(root / "strong", "style-n", uri)
    rerun = register_run(copy, "style-n", uri)
    assert rerun.created and not rerun.decision.promote and champion.decision.promote
    over_base, clip, over_champion = rerun.decision.checks
    assert over_base["passed"] and over_base["interval"][0] > 0 and over_base["draws"] == 16 * over_base["clips"]
    assert over_champion["check"] == f"beats champion v{champion.version}" and not over_champion["passed"]
    low, high = over_champion["interval"]
    assert (
        low <= 0 <= high + 1e-9
        and high - low < 1e-3
        and "champion scored now with the same draws" in over_champion["data"]
    )
    tags = MlflowClient(uri).get_model_version("style-n", rerun.version).tags
    assert (
        "draws of" in tags["vidtune.gate.beats_champion"] and "draws of" in tags["vidtune.gate.beats_base_on_val_loss"]
    )
    gate = json.loads((copy / "evaluation" / "gate.json").read_text())
    assert gate["checks"][2]["interval"] == [low, high]


def test_the_champion_is_scored_only_on_held_out_clips_it_did_not_train_on(runs, tmp_path):
    """A champion trained on other data that included one of the challenger's held-out clips: that clip is left out
    of the comparison (it would favour the champion), and the record says so."""
    import shutil

    root, _ = runs
    uri = f"sqlite:///{root}/mlflow.db"
    champion_run = tmp_path / "other-data"
    shutil.copytree(root / "weak", champion_run)
    held_out = json.loads((root / "strong" / "train_job.json").read_text())["holdout_clip_ids"]
    record = champion_run / "trained_clips" / "rank-00.json"
    trained = json.loads(record.read_text())
    record.write_text(json.dumps({**trained, "clip_ids": trained["clip_ids"] + [held_out[0]]}))
    champion = register_run(champion_run, "style-o", uri)
    challenger = register_run(root / "strong", "style-o", uri)
    over_champion = challenger.decision.checks[-1]
    assert over_champion["check"] == f"beats champion v{champion.version}"
    assert over_champion["clips"] == len(held_out) - 1 and over_champion["draws"] == 16 * (len(held_out) - 1)
    assert "1 held-out clips the champion trained on were left out" in over_champion["data"]


def test_concurrent_registration_serialises_the_gate(runs, monkeypatch):
    """The weak run's registrar pauses between reading the champion and moving the aliases while the strong run
    registers. Without the lock, the weak one would then overwrite `champion` with a decision made before the
    strong one existed; with it, the strong registrar waits and is judged against the weak champion."""
    import threading

    import vidtune.evaluation.registry as registry

    root, _ = runs
    uri = f"sqlite:///{root}/mlflow.db"
    weak_decided, strong_entered, strong_past_lock, strong_done = (threading.Event() for _ in range(4))
    decide, ensure = registry.decide, registry._ensure_model

    def pausing_decide(metrics, champion, tolerance, *evidence):
        decision = decide(metrics, champion, tolerance, *evidence)
        if threading.current_thread().name == "weak":
            weak_decided.set()
            strong_entered.wait(60)
            if strong_past_lock.wait(5):  # no lock: the strong registrar is in; let it finish first
                strong_done.wait(120)
        return decision

    def marking_ensure(client, name):
        if threading.current_thread().name == "strong":
            strong_past_lock.set()
        return ensure(client, name)

    monkeypatch.setattr(registry, "decide", pausing_decide)
    monkeypatch.setattr(registry, "_ensure_model", marking_ensure)
    results, errors = {}, []

    def register(run: str) -> None:
        try:
            if run == "strong":
                weak_decided.wait(120)
                strong_entered.set()
            results[run] = register_run(root / run, "style-b", uri)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            if run == "strong":
                strong_done.set()

    threads = [threading.Thread(target=register, args=(run,), name=run) for run in ("weak", "strong")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    client = MlflowClient(uri)
    registered = client.search_model_versions("name = 'style-b'")
    assert sorted(int(v.version) for v in registered) == [1, 2]
    assert (results["weak"].version, results["strong"].version) == ("1", "2")
    assert str(client.get_model_version_by_alias("style-b", CHAMPION).version) == results["strong"].version
    assert str(client.get_model_version_by_alias("style-b", CHALLENGER).version) == "2"  # the newest
    assert "beats champion v1" in json.dumps(results["strong"].decision.checks)  # judged after the weak one


def test_generate_from_the_champion_writes_the_requested_frames(runs, tmp_path):
    from vidtune.evaluation.inference import ModelNotFound, generate

    root, _ = runs
    uri = f"sqlite:///{root}/mlflow.db"
    register_run(root / "strong", "style-c", uri)
    out = generate(
        "models:/style-c@champion",
        "a red car",
        tmp_path / "car.mp4",
        tracking_uri=uri,
        steps=2,
        num_frames=13,
        height=32,
        width=48,
    )
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 13 and (frames[0].width, frames[0].height) == (48, 32)
    gif = generate("models:/style-c/1", "a red car", tmp_path / "car.gif", tracking_uri=uri, steps=2, lora_scale=0.5)
    assert gif.stat().st_size > 0  # default size: the training clips'
    with pytest.raises(
        ModelNotFound,
        match=r"models:/style-c@best does not exist; registered versions of style-c: v1 \[challenger, champion\]",
    ):
        generate("models:/style-c@best", "x", tmp_path / "x.mp4", tracking_uri=uri)


def test_an_unreachable_registry_fails_clearly_and_keeps_the_weights(runs, monkeypatch):
    root, _ = runs
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(
        RegistryError,
        match=r"MLflow at http://127.0.0.1:9 is unreachable .*weights are kept in .*adapter; register them later with: vidtune register .*weak --set name=style-d",
    ):
        register_run(root / "weak", "style-d", "http://127.0.0.1:9", attempts=2)
    assert (root / "weak" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_a_full_fine_tune_registers_as_a_pipeline_and_generates(prefect_api, curated, wan_model, tmp_path):
    from vidtune.evaluation.inference import generate
    from vidtune.flows.finetune import FinetuneParams, finetune

    output, _, _ = curated
    params = FinetuneParams.model_validate(
        {
            "data": str(output),
            "model": wan_model,
            "out": str(tmp_path / "full"),
            "cache_dir": str(tmp_path / "cache"),
            "precompute": {"frame_buckets": BUCKETS},
            "training_type": "full",
            "full_modules": "attention",
            "max_steps": 2,
            "mixed_precision": "no",
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "run_evaluation": False,
            "run_registration": False,
        }
    )
    finetune(params)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    registration = register_run(tmp_path / "full", "style-full", uri)
    assert registration.created and not registration.decision.promote  # not evaluated: registered, never champion
    assert registration.aliases == [CHALLENGER]
    out = generate(
        "models:/style-full@challenger", "a red car", tmp_path / "full.mp4", tracking_uri=uri, steps=2, num_frames=9
    )
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9


def test_a_run_trained_further_is_a_new_version_not_the_old_one_relabelled(runs, tiny_clip):
    from vidtune.flows.finetune import FinetuneParams, finetune

    root, made = runs
    uri = f"sqlite:///{root}/mlflow.db"
    first = register_run(root / "weak", "style-f", uri)
    job = json.loads((root / "weak" / "train_job.json").read_text())
    params = FinetuneParams.model_validate(
        {
            "data": job["tags"]["data"],
            "model": job["model"],
            "out": str(root / "weak"),
            "cache_dir": str(root / "cache"),
            "precompute": {"frame_buckets": BUCKETS},
            "rank": 4,
            "learning_rate": 2e-4,
            "max_steps": 6,
            "resume": "latest",
            "mixed_precision": "no",
            "checkpoint_every": 100,
            "tracking_uri": uri,
            "run_registration": False,
            "holdout_clips": 3,
            "evaluation": {"prompts": ["a red car"], "inference_steps": 2, "clip_model": None},
        }
    )
    finetune(params)
    assert json.loads((root / "weak" / "train_job.json").read_text())["holdout_clip_ids"] == job["holdout_clip_ids"]
    second = register_run(root / "weak", "style-f", uri)
    assert second.created and int(second.version) == int(first.version) + 1 and CHALLENGER in second.aliases


def test_a_lora_from_another_trainer_is_evaluated_like_the_run_it_came_from_and_registered(
    runs, curated, wan_model, tiny_clip, vidtune, tmp_path
):
    """The strong run's LoRA as musubi-tuner writes one (kohya keys, alpha), through `vidtune import-lora` as users
    type it: the same held-out loss as the run itself (same weights, clips and draws), then a registry version."""
    from safetensors.torch import load_file, save_file

    from tests.test_import_lora import _kohya_format
    from vidtune.training.tiny_models import TINY_CLIP

    root, made = runs
    output, _, _ = curated
    strong = made["strong"]
    comfy = load_file(f"{strong['weights']}/comfyui_lora.safetensors")
    save_file(_kohya_format(comfy), str(tmp_path / "musubi_style.safetensors"))
    code, printed = vidtune(
        "import-lora",
        str(tmp_path / "musubi_style.safetensors"),
        "--model",
        wan_model,
        "--name",
        "imported-style",
        "--data",
        str(output),
        "--out",
        str(tmp_path / "imported"),
        "--set=holdout_clips=3",
        f"--set=frame_buckets={BUCKETS}",
        f"--set=tracking_uri=sqlite:///{root}/mlflow.db",
        "--set=evaluation.prompts=[a red car, a blue sky]",
        "--set=evaluation.inference_steps=2",
        f"--set=evaluation.clip_model={TINY_CLIP}",
        f"--set=evaluation.clip_pretrained={tiny_clip}",
    )
    assert code == 0, printed
    assert "kohya-format LoRA (rank 4" in printed and "models:/imported-style/1 [challenger" in printed
    metrics = json.loads((tmp_path / "imported" / "evaluation" / "metrics.json").read_text())
    assert metrics["heldout_clips"] == strong["metrics"]["heldout_clips"] >= 3
    assert metrics["val_loss_adapted"] == pytest.approx(strong["metrics"]["val_loss_adapted"], rel=1e-4)
    assert metrics["val_loss_base"] == pytest.approx(strong["metrics"]["val_loss_base"], rel=1e-6)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version("imported-style", "1")
    assert version.tags["vidtune.base_model"] == wan_model and version.tags["vidtune.gate"]
    (evaluated_on,) = client.get_run(version.run_id).inputs.dataset_inputs  # lineage: the data it was judged on
    assert evaluated_on.dataset.name == output.name and not os.path.exists("mlruns")  # artifacts where we said

    # the ComfyUI file itself, without a dataset: sample metrics only, so the gate keeps it a challenger
    code, printed = vidtune(
        "import-lora",
        f"{strong['weights']}/comfyui_lora.safetensors",
        "--model",
        wan_model,
        "--name",
        "imported-style",
        "--out",
        str(tmp_path / "no-data"),
        f"--set=tracking_uri=sqlite:///{root}/mlflow.db",
        "--set=evaluation.prompts=[a red car]",
        "--set=evaluation.inference_steps=2",
        "--set=evaluation.num_frames=9",
        "--set=evaluation.height=64",
        "--set=evaluation.width=64",
        f"--set=evaluation.clip_model={TINY_CLIP}",
        f"--set=evaluation.clip_pretrained={tiny_clip}",
    )
    assert code == 0, printed
    metrics = json.loads((tmp_path / "no-data" / "evaluation" / "metrics.json").read_text())
    assert metrics["heldout_clips"] == 0 and metrics["val_loss_adapted"] is None and metrics["clip_alignment_adapted"]
    assert "original-format LoRA" in printed and "models:/imported-style/2 [challenger]" in printed


def test_every_model_uri_form_resolves_through_mlflow_and_pyfunc_predict_returns_mp4s(runs, tmp_path, monkeypatch):
    """A registered version as MLflow users load it: `mlflow.pyfunc.load_model` by every URI form MLflow resolves,
    `predict` with the logged signature (prompt, frames, size, steps, guidance, seed) -> one MP4 per prompt."""
    import base64

    import mlflow
    from mlflow.models import get_model_info

    root, made = runs
    uri = f"sqlite:///{root}/mlflow.db"
    registration = register_run(root / "strong", "style-uri", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what `mlflow.pyfunc.load_model` users set; undone after
    info = get_model_info("models:/style-uri/1")
    forms = [
        "models:/style-uri@champion",
        "models:/style-uri/1",
        "models:/style-uri/latest",
        f"models:/{info.model_id}",
        f"runs:/{made['strong']['mlflow_run_id']}/adapter",
    ]
    assert {get_model_info(form).model_uuid for form in forms} == {info.model_uuid}
    assert registration.model_uri == "models:/style-uri/1"
    assert [(c.name, c.required) for c in info.signature.inputs.inputs] == [("prompt", True), ("image", False)]
    assert {"num_frames", "height", "width", "steps", "guidance_scale", "seed"} <= {
        p["name"] for p in info.signature.params.to_dict()
    }
    assert info.saved_input_example_info["type"] == "dataframe"
    # lineage: the training run logged the dataset it trained on
    (logged,) = MlflowClient(uri).get_run(made["strong"]["mlflow_run_id"]).inputs.dataset_inputs
    profile = json.loads(logged.dataset.profile)
    assert logged.dataset.digest and profile["num_rows"] == made["strong"]["clips"]
    assert logged.dataset.name in logged.dataset.source, logged.dataset.source
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
    model = mlflow.pyfunc.load_model(forms[3])
    predicted = model.predict(
        pd.DataFrame({"prompt": ["a red car", "a blue sky"]}), params={"num_frames": 5, "steps": 2}
    )
    assert list(predicted["prompt"]) == ["a red car", "a blue sky"] and list(predicted["num_frames"]) == [5, 5]
    default = model.predict(pd.DataFrame({"prompt": ["a red car"]}), params={"steps": 2})
    assert (default["num_frames"][0], default["height"][0], default["width"][0]) == (9, 64, 64)  # the training size
    (tmp_path / "car.mp4").write_bytes(base64.b64decode(predicted["video"][0]))
    with av.open(str(tmp_path / "car.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_a_base_model_that_is_not_here_is_found_by_its_hub_id_or_named_in_the_message(
    runs, wan_model, tmp_path, monkeypatch
):
    """A base model in the Hugging Face cache layout records its hub id; when the folder is gone (another machine,
    offline) `generate` says what to pass, and `base_model=` (`--base-model`) renders."""
    import shutil

    from vidtune.evaluation.inference import generate
    from vidtune.evaluation.pyfunc import BaseModelMissing
    from vidtune.evaluation.registry import hub_id_of

    root, _ = runs
    uri = f"sqlite:///{root}/mlflow.db"
    snapshot = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" / "snapshots" / "0123abc"
    shutil.copytree(wan_model, snapshot)
    assert hub_id_of(str(snapshot)) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and hub_id_of(wan_model) is None
    assert hub_id_of("Lightricks/LTX-Video") == "Lightricks/LTX-Video"
    run = tmp_path / "strong-copy"
    shutil.copytree(root / "strong", run)
    info = json.loads((run / "adapter" / "vidtune.json").read_text())
    (run / "adapter" / "vidtune.json").write_text(json.dumps({**info, "base_model": str(snapshot)}))
    registration = register_run(run, "style-hub", uri)
    version = MlflowClient(uri).get_model_version("style-hub", registration.version)
    assert version.tags["vidtune.base_model_hub_id"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

    shutil.rmtree(tmp_path / "hub")  # the recorded folder is not on this machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        BaseModelMissing, match=r"Wan-AI/Wan2.1-T2V-1.3B-Diffusers cannot be loaded here .*--base-model"
    ):
        generate("models:/style-hub@champion", "a red car", tmp_path / "x.mp4", tracking_uri=uri, steps=1)
    out = generate(
        "models:/style-hub@champion", "a red car", tmp_path / "y.mp4", tracking_uri=uri, steps=1, base_model=wan_model
    )
    assert out.stat().st_size > 0


def test_mlflow_models_serve_answers_an_http_request_with_an_mp4(runs, tmp_path):
    """MLflow's own server on a registered version, bound to 127.0.0.1, asked as a client would over HTTP."""
    import base64
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    root, _ = runs
    uri = f"sqlite:///{root}/mlflow.db"
    register_run(root / "strong", "style-serve", uri)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", "models:/style-serve@champion", "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        # an activated virtualenv: MLflow starts `uvicorn` from PATH
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115  (closed with the process)
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_records": [{"prompt": "a red car"}], "params": {"steps": 2, "num_frames": 5}},
            timeout=300,
        )
        assert response.status_code == 200, response.text[:2000]
        (prediction,) = response.json()["predictions"]
        (tmp_path / "served.mp4").write_bytes(base64.b64decode(prediction["video"]))
        with av.open(str(tmp_path / "served.mp4")) as container:
            assert container.format.name.startswith("mov") and sum(1 for _ in container.decode(video=0)) == 5
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_promotion_emits_a_prefect_event_an_automation_can_react_to(runs, prefect_api):
    import time

    import httpx

    from vidtune.flows.evaluate import PROMOTED, RegisterParams, register

    root, _ = runs
    result = register(
        str(root / "strong"), RegisterParams(name="style-event", tracking_uri=f"sqlite:///{root}/mlflow.db")
    )
    assert result["promoted"]
    deadline, events = time.monotonic() + 60, []
    while time.monotonic() < deadline and not events:
        time.sleep(1)
        found = httpx.post(f"{prefect_api}/events/filter", json={"filter": {"event": {"name": [PROMOTED]}}}).json()
        events = [e for e in found["events"] if e["resource"]["prefect.resource.id"] == "vidtune.model.style-event"]
    (event,) = events
    assert event["payload"]["version"] == result["version"] and event["payload"]["model_uri"] == result["model_uri"]
    assert event["payload"]["metrics"]["val_loss_adapted"] < event["payload"]["metrics"]["val_loss_base"]
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])  # from the register flow run
    assert event["payload"]["run_dir"] == str((root / "strong").resolve())

    # the README's automation for it is one the server takes (its deployment id filled in)
    import subprocess
    import sys
    from pathlib import Path

    automation = (Path(__file__).resolve().parent.parent / "infra" / "automations" / "promoted.yaml").read_text()
    filled = automation.replace("00000000-0000-0000-0000-000000000000", "7d8f0b9e-4a47-4c1f-9a43-3b3a8c1d2e5f")
    (root / "promoted.yaml").write_text(filled)
    prefect = str(Path(sys.executable).parent / "prefect")
    created = subprocess.run(
        [prefect, "automation", "create", "--from-file", str(root / "promoted.yaml")],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0 and "Created automation 'evaluate each new vidtune champion'" in created.stdout, (
        created.stdout + created.stderr
    )


def test_importing_the_pyfunc_model_prints_no_library_warning():
    """MLflow warns on every import of a PythonModel whose `predict` has no type hint ("Add type hints ..."), and
    `vidtune ... --list-params` printed it first; the DataFrame hint keeps MLflow quiet and infers no schema."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import vidtune.evaluation.pyfunc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Add type hints" not in done.stderr, done.stderr[-2000:]
