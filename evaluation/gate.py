"""The gate's statistics: a paired comparison of two models' fixed held-out losses (`vidtune.training.heldout`),
draw by draw on the same clips, with a seeded bootstrap interval that resamples whole clips (a clip's draws share
its content, so they are not independent evidence). Pure and Prefect-free; `evaluation.registry` decides with it.

The improvement is relative: 1 - (candidate's mean loss / reference's mean loss) over the same draws, so 0.02 reads
"2 % lower held-out loss than the reference"."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class PairedGain:
    """How much lower the candidate's held-out loss is than the reference's, on `draws` paired draws of `clips`."""

    estimate: float
    low: float  # the interval's bounds at `confidence`
    high: float
    draws: int
    clips: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.estimate:+.2%} [{self.low:+.2%}, {self.high:+.2%}] ({self.confidence:.0%} interval, "
            f"{self.draws} paired draws of {self.clips} clips)"
        )


def _by_draw(losses: dict) -> dict[tuple[str, float], float]:
    return {
        (c, round(level, 9)): loss for c, level, loss in zip(losses["clip_ids"], losses["levels"], losses["losses"])
    }


def paired_gain(
    reference: dict, candidate: dict, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> PairedGain:
    """`reference` and `candidate`: `HeldoutLosses.as_dict()` of the same clips and draws (any order). The interval
    is a percentile bootstrap over clips; one clip gives no interval (-inf, inf): its draws share one content, so
    they say nothing of how the gain varies between clips, and a gate on it does not pass."""
    ref, cand = _by_draw(reference), _by_draw(candidate)
    if set(ref) != set(cand):
        missing = len(set(ref) ^ set(cand))
        raise ValueError(
            f"the two held-out measurements differ in {missing} of their draws (other clips, draws or seed): "
            "measure both models with heldout_losses on the same clips and draws"
        )
    if not ref:
        raise ValueError("no held-out draws to compare (holdout_clips is 0, or no held-out clip was found)")
    clips = sorted({clip for clip, _ in ref})
    # Per clip: the sums of each model's losses and the number of draws; a resample adds up whole clips.
    ref_sum = np.array([sum(v for (c, _), v in ref.items() if c == clip) for clip in clips])
    cand_sum = np.array([sum(v for (c, _), v in cand.items() if c == clip) for clip in clips])
    estimate = 1 - cand_sum.sum() / ref_sum.sum()
    if len(clips) < 2:
        return PairedGain(float(estimate), -math.inf, math.inf, len(ref), len(clips), confidence)
    picks = np.random.default_rng(seed).integers(0, len(clips), size=(resamples, len(clips)))
    gains = 1 - cand_sum[picks].sum(axis=1) / ref_sum[picks].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    return PairedGain(float(estimate), float(low), float(high), len(ref), len(clips), confidence)


def band_gains(reference: dict, candidate: dict, seed: int = 0) -> dict[str, PairedGain]:
    """The paired gain within each noise band (low / mid / high thirds) that both measured."""
    from vidtune.training.heldout import BANDS

    def band(losses: dict, low: float, high: float) -> dict:
        kept = [i for i, level in enumerate(losses["levels"]) if low <= level < high]
        return {key: [losses[key][i] for i in kept] for key in ("clip_ids", "levels", "losses")}

    out = {}
    for name, (low, high) in BANDS.items():
        ref, cand = band(reference, low, high), band(candidate, low, high)
        if ref["losses"]:
            out[name] = paired_gain(ref, cand, seed=seed)
    return out
