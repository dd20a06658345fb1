"""The gate's statistics (evaluation/gate.py): paired per-draw gains with a clip bootstrap, on losses shaped as the
fixed held-out evaluation writes them (16 stratified levels per clip); registry use: tests/test_registry.py."""

from __future__ import annotations

import numpy as np
import pytest

from vidtune.evaluation.gate import band_gains, paired_gain
from vidtune.evaluation.registry import decide
from vidtune.training.heldout import grid_levels


def _losses(clips: int = 8, draws: int = 16, seed: int = 0) -> dict:
    """Per-draw losses as a real evaluation has them: clips differ a lot, levels within a clip differ less."""
    rng = np.random.default_rng(seed)
    out = {"clip_ids": [], "levels": [], "losses": []}
    for clip in range(clips):
        level_of_clip = rng.uniform(0.8, 2.0)
        for level in grid_levels(f"clip-{clip}", draws):
            out["clip_ids"].append(f"clip-{clip}")
            out["levels"].append(level)
            out["losses"].append(level_of_clip * (1.2 - 0.5 * level) + rng.normal(0, 0.05))
    return out


def _scaled(losses: dict, factor) -> dict:
    return {
        **losses,
        "losses": [v * factor(c, lv) for c, lv, v in zip(losses["clip_ids"], losses["levels"], losses["losses"])],
    }


def test_a_gain_within_noise_has_an_interval_around_zero_and_a_clear_one_excludes_it():
    reference = _losses()
    rng = np.random.default_rng(1)
    jitter = {(c, lv): 1 + rng.normal(0, 0.002) for c, lv in zip(reference["clip_ids"], reference["levels"])}
    noise_only = paired_gain(reference, _scaled(reference, lambda c, lv: jitter[(c, lv)]))
    assert noise_only.low < 0 < noise_only.high and abs(noise_only.estimate) < 0.002
    assert (noise_only.draws, noise_only.clips) == (128, 8)
    better = paired_gain(reference, _scaled(reference, lambda c, lv: 0.95 * jitter[(c, lv)]))
    assert 0.03 < better.low <= better.estimate <= better.high < 0.07
    same = _scaled(reference, lambda c, lv: 0.95)
    assert paired_gain(reference, same) == paired_gain(reference, same)  # seeded: the same interval every time


def test_pairs_are_matched_by_clip_and_level_not_by_position_and_other_draws_are_refused():
    reference = _losses(clips=4)
    order = np.random.default_rng(2).permutation(len(reference["losses"]))
    shuffled = {key: [values[i] for i in order] for key, values in reference.items()}
    assert paired_gain(reference, shuffled).estimate == pytest.approx(0, abs=1e-12)
    other_seed = {**reference, "levels": [lv + 1e-3 for lv in reference["levels"]]}
    with pytest.raises(ValueError, match="differ in .* of their draws"):
        paired_gain(reference, other_seed)


def test_better_at_low_noise_and_worse_at_high_shows_in_the_bands_not_only_in_the_mean():
    reference = _losses()
    style = _scaled(reference, lambda c, lv: 0.9 if lv < 1 / 3 else (1.08 if lv >= 2 / 3 else 1.0))
    bands = band_gains(reference, style)
    assert (
        bands["low"].low > 0.05 and bands["high"].high < -0.05 and bands["mid"].estimate == pytest.approx(0, abs=1e-12)
    )
    assert sum(b.draws for b in bands.values()) == 128


def test_the_gate_promotes_on_the_lower_bound_and_records_the_evidence():
    reference = _losses()
    metrics = {"val_loss_base": 2.0, "val_loss_adapted": 1.9, "heldout_clips": 8}
    for factor, promoted in ((0.95, True), (0.999, False)):
        rng = np.random.default_rng(3)
        gain = paired_gain(reference, _scaled(reference, lambda c, lv: factor * (1 + rng.normal(0, 0.01))))
        values = {"val_loss_gain": gain.estimate, "val_loss_gain_low": gain.low, "val_loss_gain_high": gain.high}
        decision = decide({**metrics, **values, "heldout_draws": gain.draws}, None, 0.02)
        assert decision.promote is promoted, gain
        (check,) = decision.checks
        assert check["interval"] == [gain.low, gain.high] and check["draws"] == 128 and check["clips"] == 8
    assert not decide({**metrics, **values, "heldout_draws": 128}, None, 0.02, min_gain=0.5).promote


def test_one_clip_gives_no_interval_and_the_gate_does_not_pass_on_it():
    reference = _losses(clips=1)
    one = paired_gain(reference, _scaled(reference, lambda c, lv: 0.5))  # halved, but on one clip's content
    assert one.estimate == pytest.approx(0.5) and (one.low, one.high) == (-np.inf, np.inf) and one.clips == 1
    values = {"val_loss_gain": one.estimate, "val_loss_gain_low": one.low, "val_loss_gain_high": one.high}
    metrics = {"val_loss_base": 2.0, "val_loss_adapted": 1.0, "heldout_clips": 1, "heldout_draws": 16}
    assert not decide({**metrics, **values}, None, 0.02).promote


def test_the_fallback_against_a_champion_needs_min_gain_too():
    metrics = {"val_loss_base": 2.0, "val_loss_adapted": 1.5}  # a gain of 0.25, no interval
    champion = {"vidtune.val_loss_gain": "0.2", "version": "3"}
    assert decide(metrics, champion, 0.02).promote
    assert not decide(metrics, champion, 0.02, min_gain=0.1).promote  # 0.25 is not 0.1 above the champion's 0.2
