"""Every human-readable summary of a run, in one place: the markdown of the Prefect artifacts (`curate-summary`,
`evaluation`, `finetune-summary`), RUN/evaluation/report.md, and the CLI's rendering of the same markdown."""

from __future__ import annotations

import base64
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from vidtune.evaluation.metrics import HIGHER_IS_BETTER, IMAGE_METRICS, LOWER_IS_BETTER, METRICS
from vidtune.training.layout import RunLayout


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def metric_rows(results: dict) -> list[dict]:
    """One row per metric: base, adapted, delta (None where not computed) and whether adapted is better (the
    Prefect table artifact `evaluation-metrics`, and the markdown report); image-to-video metrics where measured."""
    rows = []
    measured = [name for name in IMAGE_METRICS if f"{name}_base" in results or f"{name}_adapted" in results]
    for name in (*METRICS, *measured):
        base, adapted = results.get(f"{name}_base"), results.get(f"{name}_adapted")
        delta = adapted - base if base is not None and adapted is not None else None
        better = (
            delta is not None
            and abs(delta) >= 5e-5
            and ((delta < 0 and name in LOWER_IS_BETTER) or (delta > 0 and name in HIGHER_IS_BETTER))
        )
        rows.append({"metric": name, "base": base, "adapted": adapted, "delta": delta, "better": better})
    return rows


def metrics_markdown(results: dict, run_dir: Path, decision: str | None = None) -> str:
    """Base vs adapted per metric, with the delta and whether it is better (RUN/evaluation/report.md)."""
    lines = ["| metric | base | adapted | delta |", "|---|---|---|---|"]
    for row in metric_rows(results):
        name, base, adapted, delta = row["metric"], row["base"], row["adapted"], row["delta"]
        if base is None and adapted is None:
            lines.append(f"| {name} | – | – | {results['fvd_note'] if name == 'fvd' else 'not computed'} |")
            continue
        arrow = " (better)" if row["better"] else ""
        lines.append(f"| {name} | {_fmt(base)} | {_fmt(adapted)} | {_fmt(delta)}{arrow} |")
    layout = RunLayout(Path(run_dir))
    image_to_video = any(f"{name}_base" in results for name in IMAGE_METRICS)
    started = ", each pair started from image-NN.png" if image_to_video else ""  # the conditioning images
    lines += [
        "",
        f"Held-out clips: {results.get('heldout_clips', 0)}. Samples: {layout.evaluation_samples}/ (base-NN / adapted-NN .mp4 and .gif{started}); "
        f"contact sheet: {layout.contact_sheet}",
    ]
    lines += heldout_markdown(results)
    if decision:
        lines += ["", f"Promotion gate: {decision}"]
    return "\n".join(lines) + "\n"


def _evidence(check: dict) -> str:
    if "interval" not in check:
        return check.get("data", "")
    low, high = check["interval"]
    return (
        f"{check['value']:+.4f} [{low:+.4f}, {high:+.4f}] ({check['confidence']:.0%}), {check['draws']} draws of "
        f"{check['clips']} clips; {check['data']}"
    )


def gate_markdown(name: str, version: str, decision) -> str:
    """The promotion gate's checks with the evidence each rests on (the Prefect artifact `promotion-gate`)."""
    lines = [
        f"**{name} v{version}**: {decision.summary()}",
        "",
        "| check | passed | value | threshold | gain [interval], draws; data |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['check']} | {c['passed']} | {c['value']} | {c['threshold']} | {_evidence(c)} |" for c in decision.checks
    ]
    return "\n".join(lines)


def heldout_markdown(results: dict) -> list[str]:
    """The held-out loss gain with its interval, per noise band, and what it rests on."""
    if results.get("val_loss_gain_low") is None:
        return []
    lines = [
        "",
        "| held-out loss gain (adapted over base) | estimate | 95% interval |",
        "|---|---|---|",
    ]
    for label, suffix in (("all levels", ""), *((f"{b} noise", f"_{b}_noise") for b in ("low", "mid", "high"))):
        if results.get(f"val_loss_gain{suffix}") is not None:
            value, low, high = (results[f"val_loss_gain{suffix}{end}"] for end in ("", "_low", "_high"))
            lines.append(f"| {label} | {value:+.2%} | [{low:+.2%}, {high:+.2%}] |")
    lines += [
        "",
        f"{results['heldout_draws']} paired draws ({results.get('heldout_draws_per_clip')} noise levels per clip) of "
        f"{results['heldout_clips']} held-out clips; standard error of the mean loss: base "
        f"{results.get('val_loss_se_base', float('nan')):.4f}, adapted {results.get('val_loss_se_adapted', float('nan')):.4f}.",
    ]
    if results.get("holdout_note"):
        lines += ["", f"Note: {results['holdout_note']}."]
    return lines


def curate_summary_markdown(stats: dict, output: Path) -> str:
    """The run's summary as a markdown table (the Prefect artifact `curate-summary`)."""
    sources, clips = stats["sources"], stats["clips"]
    lines = [
        f"**curate** → `{output}/shards` (manifest: `{output}/manifest.parquet`)",
        "",
        "| | total | kept | filtered | failed | resumed |",
        "|---|---|---|---|---|---|",
        f"| sources | {sources['total']} | {sources['with_clips']} | {sources['filtered']} | {sources['failed']} | {sources['resumed']} |",
        f"| clips | {sum(clips.values())} | {clips['kept']} | {clips['filtered']} | {clips['failed']} | |",
        "",
        f"hours in → out: {stats['hours_in']:.4f} h → {stats['hours_out']:.4f} h; {stats['shards']} shards",
    ]
    if stats.get("sizes"):
        lines.append("\nkept clips by size: " + ", ".join(f"{k} ({v})" for k, v in stats["sizes"].items()))
    if stats.get("media", {}).get("image"):  # images curated beside the videos
        lines.append(f"\nkept clips that are images (single frames): {stats['media']['image']}")
    for label, key in (("clips not kept", "clip_reasons"), ("sources without clips", "source_reasons")):
        if stats[key]:
            lines.append(f"\n{label}, by reason: " + ", ".join(f"{k} ({v})" for k, v in stats[key].items()))
    if stats.get("report"):  # a URI to paste in a browser (markdown renderers refuse file: links)
        lines.append(f"\nevery clip, kept or not, with thumbnails: `{Path(stats['report']).resolve().as_uri()}`")
    return "\n".join(lines)


def finetune_summary_markdown(summary: dict) -> str:
    """A finetune run's outcome (the artifact `finetune-summary`): training, the curate table, metrics and the gate."""
    losses = summary["losses"]
    lines = [
        f"**finetune** ({summary['family']}) → `{summary['weights']}`",
        "",
        "| training | |",
        "|---|---|",
        f"| clips | {sum(summary['buckets'].values())} of {summary['clips']} fit buckets {summary['buckets']} |",
        f"| steps | {summary['steps']} |",
        f"| loss | {losses[0]:.4f} (first) → {summary['final_loss']:.4f} (last) |",
        f"| speed | {summary['samples_per_s']:.2f} samples/s, peak memory {summary['peak_memory_mb']:.0f} MB |",
        f"| MLflow run | `{summary['mlflow_run_id']}` at `{summary['tracking_uri']}` |",
    ]
    if summary.get("checkpoint"):  # which weights were exported, and why
        checkpoint = summary["checkpoint"]
        lines.append(f"| exported | step {checkpoint['step']} ({checkpoint['rule']}): {checkpoint['reason']} |")
    if summary.get("heldout_curve") and Path(summary["heldout_curve"]).is_file():
        encoded = base64.b64encode(Path(summary["heldout_curve"]).read_bytes()).decode()
        lines += ["", f"![held-out loss by checkpoint](data:image/png;base64,{encoded})"]
    if summary.get("curate"):  # --raw: the curate subflow ran first
        lines = [curate_summary_markdown(summary["curate"], Path(summary["curate"]["output"])), "", *lines]
    if summary.get("metrics"):
        lines += ["", metrics_markdown(summary["metrics"], Path(summary["out"]))]
    if summary.get("registration"):
        registration = summary["registration"]
        lines += [
            "",
            f"Registered `{registration['model_uri']}` [{', '.join(registration['aliases'])}]: {registration['gate']}",
        ]
    return "\n".join(lines)


def print_curate_summary(summary: dict, console: Console) -> None:
    console.print(Markdown(curate_summary_markdown(summary, Path(summary["output"]))))


def print_finetune_summary(summary: dict, console: Console) -> None:
    console.print(Markdown(finetune_summary_markdown(summary)))
