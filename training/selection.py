"""Which weights a run ends with: the fixed held-out loss (`vidtune.training.heldout`) measured at every checkpoint,
logged by step, drawn as a curve, and the trained tensors of the lowest kept as RUN/best/, so `select_checkpoint:
best` exports those instead of the last step's. Prefect-free; the trainer calls it on the main process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidtune.training.files import atomic_path, write_json_atomic


@dataclass(frozen=True)
class Selection:
    """What the run exports and why (RUN/adapter/vidtune.json `checkpoint`, the MLflow run, the summary)."""

    rule: str  # "best" or "last"
    step: int
    heldout_loss: float | None
    reason: str

    def as_dict(self) -> dict:
        return {"rule": self.rule, "step": self.step, "heldout_loss": self.heldout_loss, "reason": self.reason}


class BestCheckpoint:
    """The held-out curve of a run (RUN/best/curve.json: step -> loss and its bands) and the weights of its lowest
    point (RUN/best/trainable.safetensors). A resumed run keeps the measurements up to its resume step."""

    def __init__(self, folder: Path, resumed_at: int = 0):
        self.folder = folder
        self.curve: dict[int, dict] = {}
        if resumed_at and self.curve_file.is_file():
            saved = json.loads(self.curve_file.read_text())
            self.curve = {int(step): point for step, point in saved.items() if int(step) <= resumed_at}

    @property
    def curve_file(self) -> Path:
        return self.folder / "curve.json"

    @property
    def weights_file(self) -> Path:
        return self.folder / "trainable.safetensors"

    def best_step(self) -> int | None:
        return min(self.curve, key=lambda step: (self.curve[step]["loss"], step)) if self.curve else None

    def record(
        self, step: int, loss: float, bands: dict[str, float], trainable: dict[str, torch.Tensor], draws: int = 0
    ) -> bool:
        """Add a measurement (of `draws` draws); keep `trainable` (what would be exported now) when it is the lowest.
        True if it is."""
        self.curve[step] = {"loss": loss, **{f"loss_{band}": value for band, value in bands.items()}, "draws": draws}
        best = self.best_step() == step
        self.folder.mkdir(parents=True, exist_ok=True)
        if best:
            with atomic_path(self.weights_file) as tmp:
                weights = {name: t.detach().contiguous().cpu() for name, t in trainable.items()}
                save_file(weights, tmp, metadata={"step": str(step)})
        write_json_atomic(self.curve_file, {str(s): point for s, point in sorted(self.curve.items())})
        return best

    def kept_step(self) -> int | None:
        """The step whose weights RUN/best/ holds (None when none are kept, or by a vidtune that did not say)."""
        if not self.weights_file.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.weights_file), "pt") as kept:
            step = (kept.metadata() or {}).get("step")
        return int(step) if step is not None else None

    def select(self, rule: str, last_step: int) -> Selection:
        """The checkpoint `rule` picks, saying why (best falls back to last when nothing was measured, or when the
        kept weights are not the best step's)."""
        best = self.best_step()
        if not self.curve:
            return Selection("last", last_step, None, "no held-out clips, so no held-out loss to choose by")
        last_loss = self.curve.get(last_step, {}).get("loss")
        if rule == "last" or best == last_step:
            why = "select_checkpoint=last" if rule == "last" else "the last step has the lowest held-out loss"
            return Selection(rule, last_step, last_loss, f"{why} ({len(self.curve)} measured)")
        if (kept := self.kept_step()) != best:
            return Selection(
                "last",
                last_step,
                last_loss,
                f"the best step is {best}, but {self.weights_file} holds "
                + (f"step {kept}'s weights" if kept is not None else "no weights of it")
                + " (a resume past it?), so the last step's are exported",
            )
        return Selection(
            "best",
            best,
            self.curve[best]["loss"],
            f"lowest fixed held-out loss of {len(self.curve)} checkpoints measured (step {best}: "
            f"{self.curve[best]['loss']:.5f}; last step {last_step}: "
            + (f"{last_loss:.5f})" if last_loss is not None else "not measured)"),
        )

    def load_best(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """Copy the kept weights into the trained parameters (before export)."""
        saved = load_file(self.weights_file)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(saved[name].to(param.device, param.dtype))

    def plot(self, path: Path, selected: Selection) -> Path | None:
        """The curve (overall and per noise band) with the selected step marked, as a PNG."""
        if not self.curve:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = sorted(self.curve)
        figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)
        for key, style in (("loss", "-o"), ("loss_low", ":"), ("loss_mid", ":"), ("loss_high", ":")):
            if key in self.curve[steps[0]]:
                axes.plot(
                    steps,
                    [self.curve[s][key] for s in steps],
                    style,
                    label=key.replace("loss_", "") + " noise" if key != "loss" else "all",
                )
        axes.axvline(selected.step, color="tab:red", linestyle="--", label=f"selected: step {selected.step}")
        axes.set(xlabel="step", ylabel="fixed held-out loss", title="held-out loss by checkpoint")
        axes.legend(fontsize=7)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        plt.close(figure)
        return path
