"""Sampling defaults, declared once: validation samples, evaluation, `vidtune generate` and inference read these
(this module imports nothing, so the CLI can show them in `--help` without loading torch)."""

INFERENCE_STEPS = 30  # denoising steps per sample
GUIDANCE_SCALE = 5.0  # classifier-free guidance (1 = off)
FPS = 16  # frame rate of written samples
