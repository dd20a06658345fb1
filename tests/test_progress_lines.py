"""Progress in a log file: a line every 10 % of the steps, not a bar redrawn with carriage returns (a 40-step run
was one 6,000-character line in CI logs); on a terminal, tqdm's bar."""

from __future__ import annotations

import io

from vidtune.training.progress_lines import StepProgress, quiet_library_bars


def test_a_log_file_gets_a_line_every_tenth_of_the_steps_with_the_latest_loss():
    log = io.StringIO()  # not a terminal
    progress = StepProgress(total=40, desc="training", stream=log)
    for step in range(1, 41):
        progress.set_postfix(loss=f"{1 / step:.4f}")
        progress.update(1)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("training: 4/40 steps (10 %), loss=0.2500, 0:00:0")
    assert lines[-1].startswith("training: 40/40 steps (100 %), loss=0.0250")


def test_a_resumed_run_counts_from_its_step_and_a_disabled_one_prints_nothing():
    log = io.StringIO()
    progress = StepProgress(total=10, initial=7, desc="training", stream=log)
    for _ in range(3):
        progress.update(1)
    counts = [line.split(" (")[0] for line in log.getvalue().splitlines()]
    assert counts == ["training: 8/10 steps", "training: 9/10 steps", "training: 10/10 steps"]
    quiet = io.StringIO()
    other_rank = StepProgress(total=10, stream=quiet, disable=True)
    other_rank.update(10)
    assert quiet.getvalue() == ""


def test_library_bars_are_off_where_stderr_is_not_a_terminal(monkeypatch):
    import diffusers.utils.logging
    import transformers.utils.logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        quiet_library_bars(io.StringIO())
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
