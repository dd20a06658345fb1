"""vidtune's bundled open_clip model configs (the tiny test CLIP), in model_configs/open_clip/: registered with
open_clip in the processes that build or load such a model (scoring, the tiny-model builders)."""

from __future__ import annotations

from pathlib import Path

OPEN_CLIP_CONFIGS = Path(__file__).parent / "model_configs" / "open_clip"


def register_model_configs() -> None:
    """Make the bundled open_clip configs known to open_clip in this process."""
    import open_clip

    if "vidtune-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(OPEN_CLIP_CONFIGS)
