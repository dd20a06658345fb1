"""Prefect tasks of the `evaluate` and `register` flows: the CLIP and motion scorers of curation measure the
samples; the registry call retries while MLflow is unreachable."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from vidtune.evaluation.evaluate import evaluate_run
from vidtune.evaluation.registry import Registration, RegistryError, register_run
from vidtune.evaluation.report import gate_markdown, metric_rows, metrics_markdown
from vidtune.tasks.scoring import (
    ClipScorer,
    cached_model,
    motion_score,
    resolve_device,
)
from vidtune.training.clip_configs import register_model_configs
from vidtune.training.sampling import SampleSettings


def clip_embedder(model_name: str, pretrained: str | None, device: str = "auto"):
    """Evaluation's CLIP, loaded once per process."""
    register_model_configs()
    device = resolve_device(device)
    scorer = cached_model(("clip", model_name, pretrained, device), lambda: load_clip(model_name, pretrained, device))

    def embed(frames, texts):
        images, text = scorer.embed(frames, texts)
        return images.cpu().numpy(), text.cpu().numpy()

    return embed


def load_clip(model_name: str, pretrained: str | None, device: str = "cpu", prefix: str = "") -> ClipScorer:
    """The CLIP model, or a ValueError naming the settings (`prefix`: "evaluation." inside finetune) and what to do
    when it cannot load (offline, unknown tag), instead of a download traceback. The finetune flow calls it before
    training, so a missing download stops no run after hours of training."""
    register_model_configs()
    try:
        return ClipScorer(model_name, pretrained, device)
    except Exception as exc:
        raise ValueError(
            f"{prefix}clip_model/{prefix}clip_pretrained: cannot load open_clip {model_name!r} with {pretrained!r} "
            f"for evaluation's CLIP metrics: {exc}. Without network access, pass a local weights file "
            f"(--set {prefix}clip_pretrained=PATH) or leave those metrics out (--set {prefix}clip_model=null)."
        ) from exc


@task(name="evaluate-run", cache_policy=NO_CACHE)
def evaluate_task(
    run: str,
    settings: SampleSettings,
    clip_model: str | None,
    clip_pretrained: str | None,
    i3d_path: str | None,
    draws: int,
) -> dict:
    embed = clip_embedder(clip_model, clip_pretrained) if clip_model else None
    metrics = evaluate_run(run, settings, embed, motion_score, i3d_path, draws)
    create_markdown_artifact(
        metrics_markdown(metrics, Path(run)), key="evaluation", description=f"base vs adapted: {run}"
    )
    create_table_artifact(
        [
            {k: v for k, v in row.items() if k != "better"} | {"better": str(row["better"])}
            for row in metric_rows(metrics)
        ],
        key="evaluation-metrics",
        description=f"base vs adapted per metric (None: not computed): {run}",
    )
    return metrics


@task(
    name="register-run",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=lambda task, run, state: isinstance(state.result(raise_on_failure=False), RegistryError),
)
def register_task(run: str, name: str, tracking_uri: str, clip_tolerance: float, min_gain: float = 0.0) -> Registration:
    registration = register_run(run, name, tracking_uri, clip_tolerance, min_gain=min_gain)
    create_markdown_artifact(
        gate_markdown(name, registration.version, registration.decision),
        key="promotion-gate",
        description="the promotion gate's decision",
    )
    for key, (link, text) in mlflow_links(tracking_uri, registration).items():
        create_link_artifact(link, link_text=text, key=key, description=f"{name} v{registration.version} in MLflow")
    return registration


def mlflow_links(tracking_uri: str, registration: Registration) -> dict[str, tuple[str, str]]:
    """Links to the version and its run: MLflow's UI pages on a tracking server; for a local database the folders
    the logged model and run keep their files in (open the UI with `mlflow ui --backend-store-uri URI`)."""
    from mlflow.tracking import MlflowClient

    name, version, run_id = registration.name, registration.version, registration.run_id
    client = MlflowClient(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        experiment = client.get_run(run_id).info.experiment_id if run_id else None
        links = {"model-version": (f"{base}/#/models/{name}/versions/{version}", f"models:/{name}/{version}")}
        if experiment:
            links["mlflow-run"] = (f"{base}/#/experiments/{experiment}/runs/{run_id}", f"MLflow run {run_id}")
        return links
    source = client.get_model_version(name, version).source
    links = (
        {
            "model-version": (
                client.get_logged_model(source.removeprefix("models:/")).artifact_location,
                f"models:/{name}/{version}",
            )
        }
        if source.startswith("models:/m-")
        else {}
    )
    if run_id:
        links["mlflow-run"] = (client.get_run(run_id).info.artifact_uri, f"MLflow run {run_id}")
    return links
