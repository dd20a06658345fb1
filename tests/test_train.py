"""The trainer on real curated clips and a tiny Wan: resume after a real SIGKILL, gradient checkpointing,
divergence, the ComfyUI export (the data order itself: tests/test_sampler.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from vidtune.training.cache import PrecomputeParams, precompute
from vidtune.training.data import cache_shards, make_stream, read_clips
from vidtune.training.families import get_family
from vidtune.training.job import TrainJob
from vidtune.training.offload import BlockSwap
from vidtune.training.params import TrainParams
from vidtune.training.shard_index import index_shards
from vidtune.training.trainer import TrainingDiverged, batch_loss, train

BUCKETS = [9, 17]


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory) -> str:
    from vidtune.training.tiny_models import build_tiny_wan

    return str(build_tiny_wan(tmp_path_factory.mktemp("wan") / "model"))


@pytest.fixture(scope="module")
def wan_cache(curated, wan_model, tmp_path_factory) -> list[str]:
    output, _, _ = curated
    family = get_family("wan")
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    result = precompute(
        shards,
        family,
        family.load_pipeline(wan_model),
        wan_model,
        tmp_path_factory.mktemp("cache"),
        PrecomputeParams(frame_buckets=BUCKETS),
    )
    return cache_shards(result.cache_dir)


def make_job(model: str, shards: list[str], out, data_source: str = "cache", **params) -> TrainJob:
    values = {
        "rank": 4,
        "learning_rate": 1e-3,
        "mixed_precision": "no",
        "max_steps": 6,
        "checkpoint_every": 3,
        **params,
    }
    return TrainJob(
        model=model,
        family="wan",
        out=str(out),
        data_source=data_source,
        shards=shards,
        frame_buckets=BUCKETS,
        sample_size=(9, 64, 64),
        params=TrainParams(**values),
        tracking_uri=f"sqlite:///{out}.mlflow.db",
    )


def _kill_self_at(step: int):
    def on_step(done: int, loss: float) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def _train_until_killed(job_json: str, step: int) -> None:
    train(TrainJob.model_validate_json(job_json), on_step=_kill_self_at(step))


def test_resume_after_a_kill_matches_an_uninterrupted_run(wan_model, wan_cache, tmp_path):
    settings = {"ema_decay": 0.9, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "warmup_steps": 2}
    full = train(make_job(wan_model, wan_cache, tmp_path / "full", checkpoint_every=2, keep_checkpoints=2, **settings))
    assert [p.name for p in full.checkpoints] == ["checkpoint-000004", "checkpoint-000006"]  # step 2's pruned

    job = make_job(wan_model, wan_cache, tmp_path / "killed", **settings)
    child = multiprocessing.get_context("spawn").Process(target=_train_until_killed, args=(job.model_dump_json(), 4))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000003"]  # complete, nothing half-written
    assert not (tmp_path / "killed" / "adapter").exists()

    with pytest.raises(ValueError, match="holds checkpoints of an earlier run; continue it with resume=latest"):
        train(job)  # starting over by accident would mix two runs' checkpoints
    killed_run = json.loads((checkpoints / "checkpoint-000003" / "trainer_state.json").read_text())["mlflow_run_id"]
    resumed = train(job.model_copy(update={"params": job.params.model_copy(update={"resume": "latest"})}))
    assert resumed.steps == full.steps == 6
    assert resumed.mlflow_run_id == killed_run  # the same MLflow run goes on: one loss curve, steps 1-6
    history = MlflowClient(job.tracking_uri).get_metric_history(killed_run, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 4, 5, 6]  # step 4 logged before the kill, then again
    assert [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))][4:] == pytest.approx(
        resumed.losses[3:6], abs=1e-6
    )
    assert resumed.losses[3:6] == pytest.approx(full.losses[3:6], abs=1e-5)
    got, want = (load_file(r.weights / "pytorch_lora_weights.safetensors") for r in (resumed, full))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    # The record written at step 3's checkpoint survived the kill; with what trained after the resume (3 steps x 2
    # micro-batches) it is what the uninterrupted run trained: the same clips in the same order at the same levels.
    after, whole = (json.loads((r.out / "trained_clips" / "rank-00.json").read_text()) for r in (resumed, full))
    assert len(after["timesteps"]) == after["micro_batches"] == 12 and after["last_resumed_at_step"] == 3
    assert {key: after[key] for key in ("clip_ids", "timesteps", "buckets")} == {
        key: whole[key] for key in ("clip_ids", "timesteps", "buckets")
    }


def _interrupt_self_at(job_json: str, step: int) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test runner may ignore SIGINT)

    def on_step(done: int, loss: float) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal sends

    try:
        train(TrainJob.model_validate_json(job_json), on_step=on_step)
    except KeyboardInterrupt:
        os._exit(130)


def test_ctrl_c_saves_the_steps_done_and_says_how_to_resume(wan_model, wan_cache, tmp_path, capfd):
    job = make_job(wan_model, wan_cache, tmp_path / "run", max_steps=4, checkpoint_every=100)  # no checkpoint due
    child = multiprocessing.get_context("spawn").Process(target=_interrupt_self_at, args=(job.model_dump_json(), 2))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 130
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000002"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]
    assert (
        f"interrupted at step 2; checkpoint to resume from: {checkpoint} (step 2). Continue with the same out folder and --set resume=latest"
        in capfd.readouterr().err
    )
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert MlflowClient(job.tracking_uri).get_run(state["mlflow_run_id"]).info.status == "KILLED"
    resumed = train(
        job.model_copy(update={"params": job.params.model_copy(update={"resume": "latest", "max_steps": 3})})
    )
    assert resumed.steps == 3 and len(resumed.losses) == 3 and resumed.mlflow_run_id == state["mlflow_run_id"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(wan_model, wan_cache):
    from vidtune.training.trainable import make_trainable

    family = get_family("wan")
    batch = next(iter(make_stream("cache", wan_cache, BUCKETS, batch_size=2, seed=0)))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pipe = family.load_pipeline(wan_model)
        trainable = make_trainable(family, pipe.transformer, TrainParams(rank=4, lora_targets=None))
        torch.nn.init.normal_(next(p for n, p in trainable.items() if "lora_B" in n))  # a LoRA that changes the output
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        pipe.transformer.train()
        torch.manual_seed(1)
        loss = batch_loss(family, pipe, pipe.transformer, batch, torch.float32)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainable.items()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert all(torch.allclose(grads_on[n], grads_off[n], atol=1e-6) for n in grads_off)


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(wan_model, wan_cache, tmp_path):
    job = make_job(
        wan_model, wan_cache, tmp_path / "run", learning_rate=1e12, max_grad_norm=1e30, checkpoint_every=1, max_steps=10
    )
    with pytest.raises(
        TrainingDiverged, match=r"loss is \[nan\] at step (\d+).*Last good checkpoint: .*checkpoint-"
    ) as info:
        train(job)
    step = int(info.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == f"checkpoint-{step - 1:06d}" and not (tmp_path / "run" / "adapter").exists()


def test_comfyui_file_is_written_by_default_and_loads_in_diffusers_like_the_diffusers_adapter(
    wan_model, wan_cache, tmp_path
):
    job = make_job(wan_model, wan_cache, tmp_path / "run", max_steps=3, learning_rate=1e-2, alpha=8.0)
    result = train(job)
    comfy = load_file(result.weights / "comfyui_lora.safetensors")
    peft = load_file(result.weights / "pytorch_lora_weights.safetensors")
    assert not any(k.endswith(".alpha") for k in comfy)  # the scale (alpha / rank = 2) is folded into lora_B
    assert torch.equal(
        comfy["diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
        2 * peft["transformer.blocks.0.attn1.to_q.lora_B.weight"],
    )

    family = get_family("wan")
    outputs = []
    for weights in ("pytorch_lora_weights.safetensors", "comfyui_lora.safetensors"):
        pipe = family.load_pipeline(wan_model)
        pipe.load_lora_weights(result.weights, weight_name=weights)
        torch.manual_seed(0)
        latents, text = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 32, 32)
        with torch.no_grad():
            outputs.append(
                pipe.transformer(
                    hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False
                )[0]
            )
    base = family.load_pipeline(wan_model)
    with torch.no_grad():
        plain = base.transformer(
            hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False
        )[0]
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5) and not torch.allclose(outputs[0], plain, atol=1e-4)


def test_a_lora_target_comfyui_cannot_name_is_refused_before_the_first_step(wan_model, wan_cache, tmp_path):
    job = make_job(wan_model, wan_cache, tmp_path / "run", max_steps=2, lora_targets=["to_q", "patch_embedding"])
    with pytest.raises(
        ValueError, match=r"lora_targets: patch_embedding has no ComfyUI module name.*export_comfyui=false"
    ):
        train(job)
    assert not (tmp_path / "run" / "checkpoints").exists()
    result = train(job.model_copy(update={"export_comfyui": False}))  # the way out the message names
    assert (result.weights / "pytorch_lora_weights.safetensors").is_file()
    assert not (result.weights / "comfyui_lora.safetensors").exists()


def test_full_fine_tuning_of_a_subset_and_on_the_fly_encoding(wan_model, curated, tmp_path):
    output, _, _ = curated
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    job = make_job(
        wan_model,
        shards,
        tmp_path / "run",
        data_source="shards",
        training_type="full",
        full_modules="attention",
        rank=32,
        max_steps=2,
        gradient_checkpointing=False,
    )
    result = train(job)
    assert result.weights.name == "model" and all(torch.isfinite(torch.tensor(result.losses)))
    trained = get_family("wan").load_pipeline(str(result.weights))  # a whole pipeline, loadable like the base
    base = get_family("wan").load_pipeline(wan_model)
    changed = {
        n
        for n, p in trained.transformer.named_parameters()
        if not torch.equal(p, dict(base.transformer.named_parameters())[n])
    }
    assert changed and all(".attn1." in n or ".attn2." in n for n in changed)


@pytest.mark.parametrize("fp8", ["cast", "scaled"])
def test_bf16_mixed_precision_with_fp8_keeps_lora_weights_in_fp32(wan_model, wan_cache, tmp_path, monkeypatch, fp8):
    """CPU autocast runs bf16; frozen Linear weights are stored as float8 (`fp8_storage`, older configs' name, is
    cast) and rebuilt per layer; the new LoRA is initialised in float32, as without float8."""
    import vidtune.training.trainer as trainer_module

    seen = {}
    real = trainer_module.make_trainable

    def spy(family, denoiser, params):  # observe the real function's result, change nothing
        trainable = real(family, denoiser, params)
        base = denoiser.blocks[0].attn1.to_q.base_layer
        stored = base.parametrizations.weight.original0 if params.fp8 == "scaled" else base.weight
        seen.setdefault("base", []).append(stored.dtype)
        seen.setdefault("lora", []).append({p.dtype for p in trainable.values()})
        seen.setdefault("init", []).append(denoiser.blocks[0].attn1.to_q.lora_A["default"].weight.detach().clone())
        return trainable

    monkeypatch.setattr(trainer_module, "make_trainable", spy)
    settings = {"fp8_storage": True} if fp8 == "cast" else {"fp8": fp8}
    result = train(make_job(wan_model, wan_cache, tmp_path / "run", mixed_precision="bf16", max_steps=3, **settings))
    train(make_job(wan_model, wan_cache, tmp_path / "fp32", max_steps=1))  # all float32: the LoRA as it should start
    assert seen["base"][0] == torch.float8_e4m3fn and seen["base"][1] == torch.float32
    assert seen["lora"] == [{torch.float32}, {torch.float32}]
    assert torch.equal(seen["init"][0], seen["init"][1])  # not made in float8 and upcast
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (
        load_file(result.weights / "pytorch_lora_weights.safetensors")[
            "transformer.blocks.0.attn1.to_q.lora_A.weight"
        ].dtype
        == torch.float32
    )


def test_resume_from_a_named_checkpoint_and_refusing_what_is_not_one(tmp_path):
    from vidtune.training.checkpoints import resolve_resume

    root = tmp_path / "checkpoints"
    assert resolve_resume(None, root) is None and resolve_resume("latest", root) is None  # nothing yet: a fresh start
    (root / "checkpoint-000002").mkdir(parents=True)
    (root / "checkpoint-000002" / "trainer_state.json").write_text("{}")
    (root / "checkpoint-000010").mkdir()
    (root / "checkpoint-000010" / "trainer_state.json").write_text("{}")
    assert resolve_resume("latest", root).name == "checkpoint-000010"
    assert resolve_resume(str(root / "checkpoint-000002"), root).name == "checkpoint-000002"
    with pytest.raises(ValueError, match="is not a vidtune checkpoint"):
        resolve_resume(str(tmp_path), root)


def test_an_unreachable_mlflow_does_not_cost_the_training_run(wan_model, wan_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    job = make_job(wan_model, wan_cache, tmp_path / "run", max_steps=2).model_copy(
        update={"tracking_uri": "http://127.0.0.1:9"}
    )
    with pytest.warns(UserWarning, match="MLflow at http://127.0.0.1:9 failed .* training continues without tracking"):
        result = train(job)
    assert (
        result.steps == 2
        and result.mlflow_run_id is None
        and (result.weights / "pytorch_lora_weights.safetensors").is_file()
    )


def test_cache_shards_are_limited_to_the_requested_buckets(tmp_path):
    for bucket in ("9x64x64", "81x64x64"):
        (tmp_path / bucket).mkdir()
        (tmp_path / bucket / "cache-000000.tar").write_bytes(b"")
    assert [p.split("/")[-2] for p in cache_shards(tmp_path, {"9x64x64"})] == ["9x64x64"]
    assert len(cache_shards(tmp_path)) == 2


def test_training_from_the_cache_never_loads_the_text_encoder(curated, wan_model, tmp_path):
    """Validation prompts are embedded at precompute; then the model's text encoder is deleted outright, and a
    run with validation samples still trains and renders them from the cached embeddings."""
    import shutil

    from vidtune.training.trainer import _prepare_model

    model = tmp_path / "wan"
    shutil.copytree(wan_model, model)
    output, _, _ = curated
    family, prompts = get_family("wan"), ["a red car in sks style"]
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))[:1]
    result = precompute(
        shards,
        family,
        family.load_pipeline(str(model)),
        str(model),
        tmp_path / "cache",
        PrecomputeParams(frame_buckets=BUCKETS),
        prompts=prompts,
    )
    shutil.rmtree(model / "text_encoder")  # loading it now would fail
    validation = {"prompts": prompts, "every": 2, "inference_steps": 2, "num_frames": 5, "height": 32, "width": 32}
    job = make_job(str(model), cache_shards(result.cache_dir), tmp_path / "run", max_steps=2, validation=validation)
    job = job.model_copy(update={"prompt_cache": str(result.prompts_dir)})

    pipe, *_ = _prepare_model(job, family, torch.device("cpu"), torch.float32)
    assert pipe.text_encoder is None
    uncached = job.model_copy(
        update={
            "params": job.params.model_copy(
                update={"validation": job.params.validation.model_copy(update={"prompts": ["a blue sky"]})}
            )
        }
    )
    with pytest.raises(ValueError, match=r"validation.prompts: \['a blue sky'\] have no cached embedding"):
        train(uncached)  # said before the first step, not at the first validation
    trained = train(job)
    assert trained.steps == 2 and all(torch.isfinite(torch.tensor(trained.losses)))
    assert (tmp_path / "run" / "samples" / "step-000002" / "sample-00.mp4").stat().st_size > 0


def test_caption_dropout_is_reproducible_and_drops_about_the_asked_share():
    from vidtune.training.data import caption_dropped

    ids = [f"clip-{i}" for i in range(4000)]
    dropped = [caption_dropped(7, 3, c, 0.1) for c in ids]
    assert 0.08 < sum(dropped) / len(ids) < 0.12
    assert dropped == [caption_dropped(7, 3, c, 0.1) for c in ids]  # a resumed run drops the same ones
    assert dropped != [caption_dropped(7, 4, c, 0.1) for c in ids]  # and another batch other ones
    assert not any(caption_dropped(7, 3, c, 0.0) for c in ids)


def test_dropped_captions_train_on_the_empty_prompt(wan_model, wan_cache, tmp_path):
    """A cached batch's dropped rows hold the empty prompt's embedding (encoded here by the model's own text
    encoder), the others stay; a run with caption_dropout trains on a different loss from the first step."""
    from vidtune.training.data import drop_captions

    family = get_family("wan")
    pipe = family.load_pipeline(wan_model)
    batch = next(iter(make_stream("cache", wan_cache, BUCKETS, batch_size=2, seed=0)))
    empty = family.encode_prompts(pipe, [""])
    dropped = drop_captions(batch, [True, False], empty)
    assert torch.allclose(dropped["text"]["embeds"][0], empty.embeds[0])
    assert not torch.allclose(batch["text"]["embeds"][0], empty.embeds[0])
    assert torch.equal(dropped["text"]["embeds"][1], batch["text"]["embeds"][1])
    on_the_fly = drop_captions({"clip_ids": ["a", "b"], "captions": ["x", "y"]}, [False, True])
    assert on_the_fly["captions"] == ["x", ""]

    plain = train(make_job(wan_model, wan_cache, tmp_path / "plain", max_steps=1, batch_size=2))
    dropping = train(make_job(wan_model, wan_cache, tmp_path / "drop", max_steps=1, batch_size=2, caption_dropout=0.99))
    assert dropping.losses[0] != pytest.approx(plain.losses[0], rel=1e-6)


def test_repeats_must_be_at_least_one():
    with pytest.raises(ValueError, match="repeats: each count must be at least 1"):
        TrainParams(repeats={"a*": 0})


def _heldout_job(model: str, shards: list[str], out, **params) -> TrainJob:
    """A job that holds three clips out (training the rest), measured with 4 draws each."""
    ids = sorted(index_shards(shards))
    job = make_job(model, shards, out, validation={"heldout_draws": 4}, **params)
    return job.model_copy(update={"holdout_clip_ids": ids[:3], "train_clip_ids": ids[3:]})


def test_the_fixed_heldout_loss_pairs_draw_by_draw_whatever_the_order_and_leaves_the_rng_alone(wan_model, wan_cache):
    from vidtune.training.heldout import BANDS, grid_levels, heldout_losses

    family = get_family("wan")
    pipe = family.load_pipeline(wan_model)
    ids = sorted(index_shards(wan_cache))[:3]
    batches = list(read_clips("cache", wan_cache, BUCKETS, set(ids)))
    seen: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(kwargs["timestep"].tolist()), with_kwargs=True
    )
    torch.manual_seed(123)
    state = torch.get_rng_state()
    forward = heldout_losses(family, pipe, batches, draws=6)
    assert torch.equal(torch.get_rng_state(), state)  # the training run's own randomness goes on untouched
    hook.remove()
    backward = heldout_losses(family, pipe, batches[::-1], draws=6)
    pairs = lambda h: {(c, round(lv, 9)): loss for c, lv, loss in zip(h.clip_ids, h.levels, h.losses)}  # noqa: E731
    assert pairs(forward) == pairs(backward) and len(forward.losses) == 18  # the same draws in any order
    for clip in ids:  # one level in each sixth of the range per clip, at a per-clip offset
        levels = sorted(lv for c, lv in zip(forward.clip_ids, forward.levels) if c == clip)
        assert [int(lv * 6) for lv in levels] == list(range(6)) and levels == pytest.approx(grid_levels(clip, 6))
    assert sorted(seen) == pytest.approx(sorted(lv * 1000 for lv in forward.levels))  # no shift, no range applied
    assert set(forward.band_means()) == set(BANDS) and forward.standard_error() > 0
    # The draws are made in fp32 on the CPU, so a bf16 measurement (a GPU's) pairs with an fp32 one draw by draw:
    # they differ by bf16 arithmetic only, far less than one draw differs from the next.
    in_bf16 = heldout_losses(family, pipe.to(dtype=torch.bfloat16), batches, draws=6)
    pipe.to(dtype=torch.float32)
    low_precision = [abs(a - b) for a, b in zip(pairs(in_bf16).values(), pairs(forward).values())]
    spread = torch.tensor(forward.losses).std().item()
    assert pairs(in_bf16).keys() == pairs(forward).keys() and max(low_precision) < 0.1 * spread


def test_the_heldout_loss_is_measured_at_each_checkpoint_and_the_lowest_exported(wan_model, wan_cache, tmp_path):
    result = train(_heldout_job(wan_model, wan_cache, tmp_path / "run", max_steps=4, checkpoint_every=2))
    curve = json.loads((result.out / "best" / "curve.json").read_text())
    assert sorted(curve, key=int) == ["2", "4"] and {"loss_low", "loss_mid", "loss_high"} <= set(curve["2"])
    best = min(curve, key=lambda s: (curve[s]["loss"], int(s)))
    assert result.checkpoint["step"] == int(best) and result.checkpoint["rule"] == "best"
    info = json.loads((result.weights / "vidtune.json").read_text())
    assert info["checkpoint"] == result.checkpoint and result.heldout_curve.is_file()
    history = MlflowClient(f"sqlite:///{tmp_path}/run.mlflow.db").get_metric_history(
        result.mlflow_run_id, "heldout_loss"
    )
    assert [(m.step, m.value) for m in history] == [(int(s), curve[s]["loss"]) for s in ("2", "4")]
    kept = load_file(result.out / "best" / "trainable.safetensors")
    exported = load_file(result.weights / "pytorch_lora_weights.safetensors")
    for name, tensor in kept.items():  # peft's names in the trainer, the adapter file's with the module prefix
        assert torch.equal(exported[f"transformer.{name.replace('.default', '')}"], tensor), name


def test_best_picks_an_earlier_checkpoint_when_the_heldout_loss_rises_and_last_keeps_the_last(tmp_path):
    from vidtune.training.selection import BestCheckpoint

    best = BestCheckpoint(tmp_path / "best")
    weights = {"a": torch.nn.Parameter(torch.zeros(3))}
    for step, loss in ((2, 1.5), (4, 1.2), (6, 1.3), (8, 1.4)):  # overfitting after step 4
        with torch.no_grad():
            weights["a"].fill_(step)
        best.record(step, loss, {"low": loss}, weights)
    chosen = best.select("best", 8)
    assert (chosen.step, chosen.heldout_loss) == (4, 1.2) and "step 4: 1.20000; last step 8: 1.40000" in chosen.reason
    best.load_best(weights)
    assert weights["a"].tolist() == [4.0, 4.0, 4.0]
    assert best.select("last", 8).step == 8 and best.plot(tmp_path / "curve.png", chosen).stat().st_size > 0
    resumed = BestCheckpoint(tmp_path / "best", resumed_at=6)  # a resume at step 6 forgets what came after it
    assert sorted(resumed.curve) == [2, 4, 6]
    assert BestCheckpoint(tmp_path / "none").select("best", 8).reason.startswith("no held-out clips")
    # RUN/best/ records its step: weights kept at another step than the curve's best are never exported as it
    resumed.record(7, 1.25, {"low": 1.25}, weights)  # not the lowest: the kept weights stay step 4's
    assert resumed.kept_step() == 4 and resumed.select("best", 7).step == 4
    (tmp_path / "best" / "trainable.safetensors").unlink()
    fallback = resumed.select("best", 7)
    assert fallback.step == 7 and "no weights of it" in fallback.reason


def test_a_failing_step_keeps_the_steps_done_names_the_bucket_and_what_lowers_memory(
    wan_model, wan_cache, tmp_path, monkeypatch
):
    from accelerate import Accelerator

    import vidtune.training.trainer as trainer
    from vidtune.training.trainer import StepFailed

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    calls, backwards, real_loss, real_backward = [], [], trainer.batch_loss, Accelerator.backward

    def recording_levels(*args, **kwargs):  # each forward's noise levels, as drawn
        levels = []
        calls.append(levels)
        *args, record = args
        return real_loss(*args, lambda inputs: (levels.append(inputs.timesteps.tolist()), record(inputs)))

    def out_of_memory_in_step_4(self, loss, **kwargs):  # its second micro-batch's backward: mid-accumulation
        backwards.append(1)
        if len(backwards) == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # a too large bucket
        return real_backward(self, loss, **kwargs)

    monkeypatch.setattr(trainer, "batch_loss", recording_levels)
    monkeypatch.setattr(Accelerator, "backward", out_of_memory_in_step_4)
    job = make_job(
        wan_model, wan_cache, tmp_path / "run", max_steps=6, checkpoint_every=100, gradient_accumulation_steps=2
    )
    with pytest.raises(
        StepFailed,
        match=r"step 4 failed \(bucket \d+x64x64, OutOfMemoryError: CUDA out .*gradient_checkpointing=true.*resume=latest",
    ):
        train(job)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-000003"]
    failed = json.loads((tmp_path / "run" / "trained_clips" / "rank-00.json").read_text())
    assert failed["micro_batches"] == len(failed["buckets"]) == len(failed["timesteps"]) == len(failed["clip_ids"]) == 6
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    resumed = train(job.model_copy(update={"params": job.params.model_copy(update={"resume": "latest"})}))
    # Two micro-batches per step after the resume too: accelerate's count was given back to the step boundary.
    record = json.loads((tmp_path / "run" / "trained_clips" / "rank-00.json").read_text())
    assert resumed.steps == 6 and record["micro_batches"] == len(record["clip_ids"]) == 12
    assert record["clip_ids"][:6] == failed["clip_ids"]
    # The failed step's draws were given back: the resume trains step 4 at the levels it first drew.
    assert calls[8][0] == calls[6][0] and calls[9][0] == calls[7][0]
    logged = MlflowClient(job.tracking_uri).get_run(resumed.mlflow_run_id).data.params
    assert logged["optimizer_used"] == "torch.optim.adamw.AdamW" and logged["optimizer"] == "adamw"

    changed = job.params.model_copy(update={"resume": "latest", "batch_size": 2, "max_steps": 8})
    with pytest.raises(ValueError, match=r"batch_size 1 -> 2\).*Resume with the checkpoint's settings"):
        train(job.model_copy(update={"params": changed}))


def test_a_run_made_to_overfit_exports_an_earlier_step_than_its_last(wan_model, wan_cache, tmp_path):
    """All weights trained hard at high noise on one clip, the one whose latents are farthest from the held-out
    clips': its training loss keeps falling while the fixed held-out loss turns back up, so `best` exports an
    earlier step, and says why."""
    ids = sorted(index_shards(wan_cache))
    means = {
        b["clip_ids"][0]: b["latents"].float().mean(dim=(0, 2, 3, 4))  # Wan caches the posterior mean
        for b in read_clips("cache", wan_cache, BUCKETS, set(ids))
    }
    centre = torch.stack([means[c] for c in ids[:3]]).mean(0)  # _heldout_job holds out ids[:3]
    far = max(ids[3:], key=lambda c: (means[c] - centre).norm().item())
    settings = {"training_type": "full", "learning_rate": 3e-3, "min_timestep": 700, "lr_scheduler": "constant"}
    job = _heldout_job(wan_model, wan_cache, tmp_path / "run", max_steps=120, checkpoint_every=15, **settings)
    result = train(job.model_copy(update={"train_clip_ids": [far]}))
    curve = {int(s): p["loss"] for s, p in json.loads((result.out / "best" / "curve.json").read_text()).items()}
    chosen = result.checkpoint
    assert sum(result.losses[-15:]) < sum(result.losses[45:60])  # training goes on improving...
    assert chosen["rule"] == "best" and chosen["step"] < 120 and curve[120] > curve[chosen["step"]]  # ...held-out not
    assert chosen["heldout_loss"] == min(curve.values()) and f"last step 120: {curve[120]:.5f}" in chosen["reason"]
    info = json.loads((result.weights / "vidtune.json").read_text())
    assert info["checkpoint"]["step"] == chosen["step"] and info["steps"] == 120


GRADIENT_CHECK = """
import socket, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vidtune.training import trainer


def worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    ours = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    ours.load_state_dict(reference.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(reference)
    data = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(rank))  # each rank its own micro-batches
    trainer.GRADIENT_BUCKET = 7  # several buckets, one gradient larger than a bucket
    for micro, x in enumerate(data):  # two micro-batches accumulated, as accelerate scales them
        with ddp.no_sync() if micro == 0 else torch.enable_grad():
            (ddp(x).square().mean() / 2).backward()
        (ours(x).square().mean() / 2).backward()
    trainer.average_gradients([p.grad for p in ours.parameters()], 2)
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(reference.parameters(), ours.parameters()))
    spread = max(p.grad.abs().max().item() for p in reference.parameters())
    with open(f"{out}/rank-{rank}.txt", "w") as f:
        f.write(f"{worst} {spread}")
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1]), nprocs=2)
"""


def test_our_gradient_all_reduce_gives_what_ddp_gives(tmp_path):
    """Two gloo ranks, two accumulated micro-batches each: `average_gradients` (what the trainer runs after every
    rank said its backward completed) equals DDP's all-reduced gradients."""
    import subprocess
    import sys

    script = tmp_path / "gradient_check.py"
    script.write_text(GRADIENT_CHECK)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        worst, spread = map(float, (tmp_path / f"rank-{rank}.txt").read_text().split())
        assert spread > 1e-3 and worst <= 1e-6 * spread


@pytest.mark.parametrize(
    "settings",
    [{"blocks_to_swap": 1}, {"blocks_to_swap": 2, "fp8": "scaled"}, {"blocks_to_swap": 2, "training_type": "full"}],
    ids=["lora", "lora-fp8-scaled-all-blocks", "full-attention"],
)
def test_a_run_with_block_swap_trains_what_the_resident_run_trains(wan_model, wan_cache, tmp_path, settings):
    """offload=blocks through the trainer (the adapter made on the host, the swapped blocks' frozen weights kept
    there, held-out measurement and samples rendered through the same hooks): the same losses and weights as the
    run without it, for a LoRA (over bf16 or scaled float8 weights) and a full fine-tune of the attention."""
    validation = {"prompts": ["a red car"], "every": 4, "inference_steps": 2}
    common = {k: v for k, v in settings.items() if k != "blocks_to_swap"}
    if common.get("training_type") == "full":
        common |= {"full_modules": "attention", "learning_rate": 1e-5}
    plain = train(make_job(wan_model, wan_cache, tmp_path / "plain", max_steps=4, validation=validation, **common))
    swapped = train(
        make_job(
            wan_model,
            wan_cache,
            tmp_path / "swap",
            max_steps=4,
            validation=validation,
            offload="blocks",
            **settings,
            **{k: v for k, v in common.items() if k not in settings},
        )
    )
    assert swapped.losses == pytest.approx(plain.losses, rel=1e-6)
    weights = (
        "pytorch_lora_weights.safetensors" if common.get("training_type") != "full" else "transformer/*.safetensors"
    )
    want = {k: v for f in plain.weights.glob(weights) for k, v in load_file(f).items()}
    got = {k: v for f in swapped.weights.glob(weights) for k, v in load_file(f).items()}
    assert want and sorted(got) == sorted(want)  # a full save holds the swapped blocks' frozen weights too
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in want)
    assert (tmp_path / "swap" / "samples" / "step-000004" / "sample-00.mp4").is_file()


def test_block_swap_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="blocks_to_swap: offload=blocks needs at least 1"):
        TrainParams(offload="blocks")
    with pytest.raises(ValueError, match="blocks_to_swap: 2 blocks swap only with offload=blocks"):
        TrainParams(blocks_to_swap=2)
    with pytest.raises(ValueError, match="fp8=scaled needs gradient_checkpointing=true"):
        TrainParams(offload="blocks", blocks_to_swap=2, fp8="scaled", gradient_checkpointing=False)
    with pytest.raises(ValueError, match="use fp8=scaled"):
        TrainParams(offload="blocks", blocks_to_swap=2, fp8_storage=True)
    with pytest.raises(ValueError, match="the swapped blocks have no frozen weights"):
        BlockSwap([torch.nn.Linear(2, 2)], 1, torch.device("cpu"))


def test_data_workers_default_to_reading_ahead_on_a_gpu_only():
    from vidtune.training.checkpoints import data_layout
    from vidtune.training.params import DATA_WORKERS_ON_GPU

    expected = DATA_WORKERS_ON_GPU if torch.cuda.is_available() else 0
    assert TrainParams().data_workers is None and TrainParams().resolved_data_workers() == expected
    assert (
        TrainParams(data_workers=3).resolved_data_workers() == 3
        and TrainParams(data_workers=0).resolved_data_workers() == 0
    )
    assert data_layout(2, TrainParams())["data_workers"] == expected  # what a resume compares: the workers used
