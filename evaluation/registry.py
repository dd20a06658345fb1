"""The MLflow model registry: log a finished run's adapter or full pipeline as vidtune's video pyfunc
(`vidtune.evaluation.pyfunc`: loads with `mlflow.pyfunc.load_model`, serves with `mlflow models serve`), register it
as a new version aliased `challenger`, and move `champion` only through the promotion gate. Registration is idempotent: a retried call finds the version it made and does not add another.

Gate (all must hold to promote), every comparison paired draw by draw on the same held-out clips, with a seeded
bootstrap interval over clips (`vidtune.evaluation.gate`):
- the adapted model beats the base: the interval's lower bound of its held-out loss gain is above `min_gain`;
- CLIP alignment does not drop more than `clip_tolerance` below the base's;
- it beats the current champion built on the same base model: the champion's adapter is loaded from the registry
  and scored now on this run's held-out clips with the same draws, and the lower bound of the challenger's gain
  over it is above `min_gain`. Where the champion cannot be scored so (it has no loadable weights here, or this run
  has no held-out clips), their gains over the base on their own data are compared, and the record says so.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vidtune.evaluation.gate import PairedGain, paired_gain
from vidtune.evaluation.pyfunc import MODEL_CODE, SIGNATURE, input_example
from vidtune.training.adapters import read_info
from vidtune.training.data import read_clips
from vidtune.training.families import get_family
from vidtune.training.files import write_json_atomic
from vidtune.training.heldout import heldout_losses, measured_on
from vidtune.training.job import TrainJob
from vidtune.training.layout import RunLayout
from vidtune.training.tracking import experiment_id, log_dataset, point_mlflow_at, vidtune_home

CHALLENGER, CHAMPION = "challenger", "champion"


class RegistryError(RuntimeError):
    """The registry could not be reached or used; the trained weights stay on disk."""


@dataclass
class GateDecision:
    promote: bool
    checks: list[dict] = field(default_factory=list)  # {"check", "passed", "value", "threshold"}

    def summary(self) -> str:
        verdict = "promoted to champion" if self.promote else "kept as challenger"
        failed = [c["check"] for c in self.checks if not c["passed"]]
        return verdict + (f" (failed: {', '.join(failed)})" if failed else "")


def relative_gain(metrics: dict) -> float | None:
    base, adapted = metrics.get("val_loss_base"), metrics.get("val_loss_adapted")
    if base is None or adapted is None or base == 0:
        return None
    return (base - adapted) / base


def _interval_check(check: str, gain: PairedGain, min_gain: float, data: str) -> dict:
    return {
        "check": check,
        "passed": gain.low > min_gain,
        "value": gain.estimate,
        "threshold": min_gain,
        "interval": [gain.low, gain.high],
        "confidence": gain.confidence,
        "draws": gain.draws,
        "clips": gain.clips,
        "data": data,
    }


def decide(
    metrics: dict | None,
    champion: dict | None,
    clip_tolerance: float,
    min_gain: float = 0.0,
    against_champion: PairedGain | None = None,
    champion_note: str = "",
) -> GateDecision:
    """Pure: the gate's checks from this run's metrics, the champion's version tags (same base model) and, when the
    champion was scored on this run's held-out draws, the paired gain over it."""
    if not metrics:
        return GateDecision(False, [{"check": "evaluated", "passed": False, "value": None, "threshold": None}])
    checks = []
    heldout = f"this run's {metrics.get('heldout_clips', 0)} held-out clips"
    if metrics.get("val_loss_gain_low") is not None:
        over_base = PairedGain(
            metrics["val_loss_gain"],
            metrics["val_loss_gain_low"],
            metrics["val_loss_gain_high"],
            int(metrics["heldout_draws"]),
            int(metrics["heldout_clips"]),
        )
        checks.append(_interval_check("beats base on val_loss", over_base, min_gain, heldout))
    else:  # no paired draws (an evaluation by an older vidtune, or no held-out clips): the point estimate
        gain = relative_gain(metrics)
        checks.append(
            {
                "check": "beats base on val_loss",
                "passed": gain is not None and gain > min_gain,
                "value": metrics.get("val_loss_adapted"),
                "threshold": metrics.get("val_loss_base"),
                "data": f"{heldout}, no interval (evaluate the run again for one)",
            }
        )
    base_clip, clip = metrics.get("clip_alignment_base"), metrics.get("clip_alignment_adapted")
    if base_clip is not None and clip is not None:
        checks.append(
            {
                "check": "clip_alignment within tolerance",
                "passed": clip >= base_clip - clip_tolerance,
                "value": clip,
                "threshold": base_clip - clip_tolerance,
            }
        )
    if champion is not None and against_champion is not None:
        data = f"{heldout}, the champion scored now with the same draws" + (
            f" ({champion_note})" if champion_note else ""
        )
        checks.append(_interval_check(f"beats champion v{champion['version']}", against_champion, min_gain, data))
    elif champion is not None and champion.get("vidtune.val_loss_gain") not in (None, "None"):
        best, gain = float(champion["vidtune.val_loss_gain"]), relative_gain(metrics)
        checks.append(
            {
                "check": f"beats champion v{champion['version']}",
                "passed": gain is not None and gain > best + min_gain,
                "value": gain,
                "threshold": best + min_gain,
                "data": "each model's gain over the base on its own held-out clips"
                + (f" ({champion_note})" if champion_note else ""),
            }
        )
    return GateDecision(all(c["passed"] for c in checks), checks)


def score_champion(
    model_uri: str, run_dir: Path, tracking_uri: str, champion_run_dir: str | None = None
) -> tuple[PairedGain | None, str]:
    """The challenger's paired gain over `model_uri`, scored now on the challenger's held-out clips that the champion
    did not train on, with the draws the challenger's evaluation used; and what the record should say about it.
    (None, why) when that cannot be done here: the gate then falls back to the tag comparison, and says why."""
    from vidtune.evaluation.inference import load_registered_pipeline

    layout = RunLayout(run_dir)
    job = TrainJob.find(run_dir)
    if job is None or not job.holdout_clip_ids or not layout.heldout_losses.is_file():
        return None, "this run has no held-out draws to score the champion on"
    saved = json.loads(layout.heldout_losses.read_text())
    clips, notes = set(job.holdout_clip_ids), []
    seen = trained_clip_ids(champion_run_dir)
    if seen is None:
        notes.append("the champion's training clips are not readable here, so overlap with these was not checked")
    elif overlap := clips & seen:
        clips -= overlap
        if not clips:
            return None, "the champion trained on every one of this run's held-out clips"
        notes.append(f"{len(overlap)} held-out clips the champion trained on were left out")
    try:
        batches = list(read_clips(job.data_source, job.shards, job.frame_buckets, clips))
        pipe, _ = load_registered_pipeline(model_uri, tracking_uri, base_model=job.model)
        family = get_family(job.family)
        champion = heldout_losses(family, pipe, batches, draws=saved["draws"])
        weights = next(getattr(pipe, family.denoiser_name).parameters())
    except Exception as exc:  # noqa: BLE001 - out of memory, missing weights...: the tag comparison decides, and says why
        return None, f"the champion could not be scored here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    now = measured_on(weights.device, weights.dtype)
    if saved.get("measured_on", now) != now:
        notes.append(f"this run was measured on {saved['measured_on']}, the champion on {now}")
    adapted = saved["adapted"]
    keep = [i for i, clip in enumerate(adapted["clip_ids"]) if clip in clips]
    challenger = {key: [adapted[key][i] for i in keep] for key in ("clip_ids", "levels", "losses")}
    return paired_gain(champion.as_dict(), challenger), "; ".join(notes)


def trained_clip_ids(run_dir: str | Path | None) -> set[str] | None:
    """Every clip a run trained on, from its RUN/trained_clips/ records (None when they are not readable here)."""
    if not run_dir:
        return None
    records = sorted((Path(run_dir) / "trained_clips").glob("rank-*.json"))
    if not records:
        return None
    return {clip for record in records for clip in json.loads(record.read_text()).get("clip_ids", [])}


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    created: bool  # False: an earlier call had registered this run already
    decision: GateDecision
    aliases: list[str]
    run_id: str | None = None  # the MLflow run holding the logged model


def _retrying(call, attempts: int, what: str, tracking_uri: str):
    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as exc:
            if (
                exc.error_code not in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "ENDPOINT_NOT_FOUND")
                and "connect" not in str(exc).lower()
            ):
                raise
            error = exc
        except (ConnectionError, OSError) as exc:
            error = exc
        time.sleep(min(2**attempt, 10))
    raise RegistryError(
        f"MLflow at {tracking_uri} is unreachable while trying to {what} ({type(error).__name__}: {str(error)[:200]})"
    )


def _find_version(client: MlflowClient, name: str, run_dir: str, weights_sha: str):
    """The version made from these very weights of this run folder (a run trained further is a new version)."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("vidtune.run_dir") == run_dir and version.tags.get("vidtune.weights_sha256") == weights_sha:
            return version
    return None


def weights_digest(weights: Path) -> str:
    """sha256 over the tensors (names and values) of an adapter/ or model/ folder. File bytes would not do:
    safetensors writes its metadata in hash-map order, which differs from process to process."""
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(weights.rglob("*.safetensors")):
        if path.name.startswith("comfyui_lora"):  # derived from the adapter (one file per expert)
            continue
        with safe_open(str(path), "pt") as tensors:
            for key in sorted(tensors.keys()):
                digest.update(f"{path.relative_to(weights)}:{key}".encode())
                digest.update(tensors.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _log_weights(run_dir: Path, info: dict, run_id: str | None, tracking_uri: str) -> tuple[str, str]:
    """Log the weights into the run that trained them (or a new one); returns (model uri, run id)."""
    import mlflow

    if run_id is not None:
        try:
            MlflowClient(tracking_uri).get_run(run_id)
        except MlflowException:  # trained against another tracking server (or untracked): log into a new run
            run_id = None
    point_mlflow_at(tracking_uri)
    layout = RunLayout(run_dir)
    job = TrainJob.find(run_dir)
    new_run = {}
    if run_id is None:  # in the run's experiment, whose artifacts go where vidtune says (not ./mlruns)
        new_run = {
            "run_name": f"register {run_dir.name}",
            "experiment_id": experiment_id(MlflowClient(tracking_uri), job.experiment if job else "vidtune"),
        }
    with mlflow.start_run(run_id=run_id, **new_run) as run:
        if new_run and job is not None and "data" in job.tags:  # an imported LoRA: the data it was evaluated on
            log_dataset(MlflowClient(tracking_uri), run.info.run_id, Path(job.tags["data"]), "evaluation")
        evaluation, metrics = layout.evaluation, layout.read_metrics() or {}
        mlflow.log_metrics(
            {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        if evaluation.is_dir():
            mlflow.log_artifacts(str(evaluation), "evaluation")  # samples, contact sheet, report
        sample_size = list(job.sample_size) if job else None
        config = {
            "family": info["family"],
            "training_type": info["training_type"],
            "base_model": info["base_model"],
            "base_model_hub_id": hub_id_of(info["base_model"]),
            "sample_size": sample_size,
        }
        lora = info["training_type"] == "lora"
        logged = mlflow.pyfunc.log_model(
            name="adapter" if lora else "model",
            python_model=str(MODEL_CODE),  # models from code: no pickle
            artifacts={"adapter": str(layout.adapter)} if lora else {"pipeline": str(layout.model)},
            model_config=config,
            signature=SIGNATURE,
            input_example=input_example(tuple(sample_size), info["family"]) if sample_size else None,
            pip_requirements=pip_requirements(),
        )
        return logged.model_uri, run.info.run_id


def hub_id_of(model: str) -> str | None:
    """The hub id a base model can be fetched by on another machine: the id itself, or the repo of a local copy in
    the Hugging Face cache layout (`.../models--ORG--NAME/snapshots/REV`); None for other local folders."""
    path = Path(model).expanduser()
    if not path.exists() and not str(model).startswith((".", "/", "~")) and str(model).count("/") == 1:
        return str(model)
    for part in path.resolve().parts if path.exists() else ():
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.removeprefix("models--").split("--", 1))
    return None


def pip_requirements() -> list[str]:
    """What a served version needs: vidtune and the libraries its model code imports, at this machine's versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("vidtune", "diffusers", "peft", "torch", "transformers", "mlflow"):
        try:
            out.append(
                f"{package}=={version(package)}" if package != "torch" else f"torch>={version(package).split('+')[0]}"
            )
        except PackageNotFoundError:
            out.append(package)
    return out


def register_run(
    run_dir: str | Path,
    name: str,
    tracking_uri: str,
    clip_tolerance: float = 0.02,
    attempts: int = 3,
    min_gain: float = 0.0,
) -> Registration:
    """Register a finished run's weights (idempotently) and apply the promotion gate; see the module docstring."""
    run_dir = Path(run_dir).resolve()
    layout = RunLayout(run_dir)
    weights = layout.weights()
    if not weights.is_dir():
        raise FileNotFoundError(f"run: {run_dir} has no adapter/ or model/; is it a finished `vidtune finetune` run?")
    info = read_info(weights)
    metrics = layout.read_metrics()
    try:
        point_mlflow_at(tracking_uri)  # MLflow resolves the logged model's URI through it
        return _register(run_dir, weights, info, metrics, name, tracking_uri, clip_tolerance, attempts, min_gain)
    except RegistryError as exc:
        raise RegistryError(
            f"{exc}. The trained weights are kept in {weights}; register them later with: "
            f"vidtune register {run_dir} --set name={name} --set tracking_uri={tracking_uri}"
        ) from exc


def _register(
    run_dir: Path,
    weights: Path,
    info: dict,
    metrics: dict | None,
    name: str,
    tracking_uri: str,
    clip_tolerance: float,
    attempts: int,
    min_gain: float = 0.0,
) -> Registration:
    from filelock import FileLock

    client = MlflowClient(tracking_uri)
    lock_dir = vidtune_home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    # One registrar at a time per model name on this machine: read champion, decide, move aliases.
    with FileLock(str(lock_dir / f"registry-{name}.lock"), timeout=600):
        _retrying(lambda: _ensure_model(client, name), attempts, f"create registered model {name}", tracking_uri)
        weights_sha = weights_digest(weights)
        existing = _retrying(
            lambda: _find_version(client, name, str(run_dir), weights_sha), attempts, "look up versions", tracking_uri
        )
        created = existing is None
        if created:
            model_uri, run_id = _retrying(
                lambda: _log_weights(run_dir, info, info.get("mlflow_run_id"), tracking_uri),
                attempts,
                "log the weights",
                tracking_uri,
            )
            job = TrainJob.find(run_dir)
            tags = {
                "vidtune.run_dir": str(run_dir),
                "vidtune.weights_sha256": weights_sha,
                "vidtune.sample_size": "x".join(map(str, job.sample_size if job else ())),
                "vidtune.base_model": info["base_model"],
                "vidtune.base_model_hub_id": hub_id_of(info["base_model"]) or "",
                "vidtune.family": info["family"],
                "vidtune.training_type": info["training_type"],
                "vidtune.val_loss_gain": str(relative_gain(metrics or {})),
                **{
                    f"vidtune.metric.{k}": str(v) for k, v in (metrics or {}).items() if not isinstance(v, (dict, list))
                },
            }
            existing = _retrying(
                lambda: client.create_model_version(name, model_uri, run_id=run_id, tags=tags),
                attempts,
                "register",
                tracking_uri,
            )
        version = existing
        champion = _retrying(
            lambda: _champion_of_base(client, name, info["base_model"], exclude=str(version.version)),
            attempts,
            "look up the champion",
            tracking_uri,
        )
        against, note = (None, "")
        if champion is not None and metrics:  # once, outside the retries: it loads and scores a model
            champion_uri = f"models:/{name}/{champion['version']}"
            against, note = score_champion(champion_uri, run_dir, tracking_uri, champion.get("vidtune.run_dir"))
        decision = decide(metrics, champion, clip_tolerance, min_gain, against, note)
        _retrying(lambda: _apply_gate(client, name, version, decision), attempts, "move aliases", tracking_uri)
    write_json_atomic(RunLayout(run_dir).gate, {"name": name, "version": str(version.version), **asdict(decision)})
    aliases = client.get_model_version(name, version.version).aliases
    return Registration(
        name,
        str(version.version),
        f"models:/{name}/{version.version}",
        created,
        decision,
        list(aliases),
        version.run_id,
    )


def _apply_gate(client: MlflowClient, name: str, version, decision: GateDecision) -> GateDecision:
    """Move aliases by the decision: `challenger` to the newest version, `champion` to this one if it passed; and
    record the evidence on the version and its run."""
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if int(version.version) == newest:  # a repeated call for an older version must not move it back
        client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(version.version))
    client.set_model_version_tag(name, str(version.version), "vidtune.gate", decision.summary())
    for check in decision.checks:  # the evidence: each interval and how many draws it rests on
        if "interval" in check:
            key = "vidtune.gate." + re.sub(r" v\d+$", "", check["check"]).replace(" ", "_")
            low, high = check["interval"]
            evidence = (
                f"{check['value']:+.4f} [{low:+.4f}, {high:+.4f}] over {check['draws']} draws of {check['clips']} clips"
            )
            client.set_model_version_tag(name, str(version.version), key, evidence)
    if version.run_id:
        client.set_tag(version.run_id, "vidtune.gate", decision.summary())
        client.log_dict(version.run_id, asdict(decision), "evaluation/gate.json")
    return decision


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="vidtune fine-tunes; aliases: champion (promoted), challenger (newest)"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another registrar made it meanwhile
                raise


def _champion_of_base(client: MlflowClient, name: str, base_model: str, exclude: str) -> dict | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    if str(champion.version) == exclude or champion.tags.get("vidtune.base_model") != base_model:
        return None
    return {**champion.tags, "version": champion.version}
