"""The layout of a curate OUTPUT folder, and the guard against mixing runs with different settings."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from vidtune.tasks.files import write_json_atomic
from vidtune.training.layout import DatasetLayout


class OutputMismatchError(ValueError):
    """OUTPUT holds clips made with other settings."""


@dataclass(frozen=True)
class OutputLayout(DatasetLayout):
    """The dataset as readers see it, plus curate's own resumable state under `.vidtune/`."""

    @property
    def state(self) -> Path:
        return self.root / ".vidtune"

    @property
    def staging(self) -> Path:
        return self.state / "staging"

    @property
    def downloads(self) -> Path:
        return self.state / "downloads"

    @property
    def settings_file(self) -> Path:
        return self.state / "clip_settings.json"


def prepare_output(root: Path, clip_settings: dict, overwrite: bool, defaults: dict | None = None) -> OutputLayout:
    """Create OUTPUT, or reuse it when it was made with the same clip settings (resume / add sources).

    Different settings would mix incompatible clips in one dataset, so that is refused unless `overwrite`. A setting
    added to vidtune after OUTPUT was made counts as its value in `defaults` (what the older version did).
    """
    layout = OutputLayout(Path(root))
    if layout.settings_file.exists():
        previous = _with_defaults(json.loads(layout.settings_file.read_text()), defaults or {})
        if previous != clip_settings:
            if not overwrite:
                changed = sorted(_changed_keys(previous, clip_settings))
                raise OutputMismatchError(
                    f"output: {root} was curated with different settings ({', '.join(changed)}); "
                    "use a new OUTPUT folder, or pass --set overwrite=true to replace its contents"
                )
            for path in (layout.shards, layout.state, layout.manifest, layout.stats):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    layout.staging.mkdir(parents=True, exist_ok=True)
    layout.shards.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.settings_file, clip_settings)
    return layout


def dataset_trigger(root: str | Path) -> str:
    """The caption trigger word(s) a dataset was curated with ("" when unknown, e.g. shards made elsewhere)."""
    settings = OutputLayout(Path(root).expanduser()).settings_file
    if not settings.is_file():
        return ""
    return json.loads(settings.read_text()).get("captions", {}).get("trigger", "")


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults`, at every level."""
    merged = {**defaults, **saved}
    return {
        k: _with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
        for k, v in merged.items()
    }


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
