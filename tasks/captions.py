"""Captions for clips: sidecar text, a template over the trigger word and clip metadata, or a vision-language model.

Every caption is the `template` rendered with these fields, then tidied (whitespace, empty comma segments):
`{trigger}`, `{sidecar}` (the source's sidecar text), `{vlm}` (the model's caption), `{source_name}`,
`{start_s}`, `{end_s}`, `{duration_s}`. Each mode only picks the default template.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import threading
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.tasks.records import ClipRecord

log = logging.getLogger(__name__)
TEMPLATE_FIELDS = ("trigger", "sidecar", "vlm", "source_name", "start_s", "end_s", "duration_s")
DEFAULT_TEMPLATES = {
    "sidecar": "{trigger}, {sidecar}",
    "template": "{trigger}, {source_name}",
    "vlm": "{trigger}, {vlm}",
}
CHAT_PROMPT = "Describe this video in one sentence."
MAPPING_FILES = ("captions.csv", "captions.jsonl")


class CaptionParams(BaseModel):
    """How clips are captioned."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "sidecar", "template", "vlm"] = Field(
        "auto", description="auto = sidecar text when the source has one, else the template."
    )
    trigger: str = Field("", description="Trigger word(s) for a style LoRA, e.g. 'in sks style'.")
    template: str | None = Field(None, description="Caption template; default depends on mode (see README).")
    sidecar_file: str | None = Field(
        None, description="captions.csv (file,caption) or .jsonl mapping; default: one at the input root if present."
    )
    vlm_model: str | None = Field(None, description="transformers captioner (local folder or hub id) for mode=vlm.")
    vlm_prompt: str | None = Field(None, description="Prompt for chat VLMs (default asks for one sentence).")
    vlm_frames: int = Field(4, ge=1, le=16, description="Frames per clip given to the VLM, tiled into one image.")
    vlm_max_new_tokens: int = Field(40, ge=1, le=512, description="Longest caption the VLM may write.")
    vlm_batch_size: int = Field(8, ge=1, description="Clips captioned per forward pass.")

    @model_validator(mode="after")
    def _vlm_needs_a_model(self) -> CaptionParams:
        if self.mode == "vlm" and not self.vlm_model:
            raise ValueError("vlm_model is required when mode is 'vlm' (a local folder or a hub id)")
        if self.template is not None:
            try:
                self.template.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"template: unknown field or bad format {exc} (fields: {', '.join(TEMPLATE_FIELDS)})"
                ) from None
        return self

    def template_for(self, has_sidecar: bool) -> str:
        if self.template:
            return self.template
        if self.mode == "auto":
            return DEFAULT_TEMPLATES["sidecar" if has_sidecar else "template"]
        return DEFAULT_TEMPLATES[self.mode]


# --------------------------------------------------------------------------------------------- sidecars


def load_caption_mapping(path: str) -> dict[str, str]:
    """file -> caption from a CSV (columns file/path/video and caption/text) or JSON-lines file."""
    with fsspec.open(path, "r", encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    mapping = {}
    for row in rows:
        key = next((row[k] for k in ("file", "path", "video", "source") if row.get(k)), None)
        value = next((row[k] for k in ("caption", "text", "prompt") if row.get(k) is not None), None)
        if key is None or value is None:
            raise ValueError(f"captions.sidecar_file {path}: each row needs a file and a caption column, got {row}")
        mapping[key] = str(value)
    return mapping


def find_mapping_file(input_root: str) -> str | None:
    fs, root = fsspec.core.url_to_fs(input_root)
    if fs.isfile(root):
        return None
    for name in MAPPING_FILES:
        candidate = f"{input_root.rstrip('/')}/{name}"
        if fs.exists(f"{root.rstrip('/')}/{name}"):
            return candidate
    return None


def sidecar_caption(source_path: str, input_root: str, mapping: dict[str, str]) -> str | None:
    """A source's sidecar text: `VIDEO.txt` beside it, else its entry in the mapping (by relative path or name)."""
    beside = re.sub(r"\.[^./]+$", ".txt", source_path)
    fs, local = fsspec.core.url_to_fs(beside)
    if fs.isfile(local):
        try:
            with fs.open(local, "r", encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable sidecar caption %s: %s", beside, exc)
    relative = source_path.removeprefix(input_root.rstrip("/") + "/")
    for key in (relative, Path(source_path).name, source_path):
        if key in mapping:
            return mapping[key].strip()
    return None


# --------------------------------------------------------------------------------------------- templates


def render_caption(template: str, row: ClipRecord, *, trigger: str, sidecar: str | None, vlm: str | None) -> str:
    fields = {
        "trigger": trigger,
        "sidecar": sidecar or "",
        "vlm": vlm or "",
        "source_name": re.sub(r"[_\-.]+", " ", Path(row.source).stem).strip(),
        "start_s": f"{row.start_s:.2f}",
        "end_s": f"{row.end_s:.2f}",
        "duration_s": f"{row.end_s - row.start_s:.2f}",
    }
    try:
        text = template.format(**fields)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"captions.template: unknown field {exc} (available: {', '.join(fields)})") from None
    return tidy_caption(text)


def prompt_with_trigger(prompt: str, trigger: str) -> str:
    """A sample prompt written for any style, e.g. "a city street at night, {trigger}", with the dataset's trigger
    word(s) put in (and tidied like a caption, so an empty trigger leaves no dangling comma)."""
    return tidy_caption(prompt.replace("{trigger}", trigger)) if "{trigger}" in prompt else prompt


def tidy_caption(text: str) -> str:
    parts = [re.sub(r"\s+", " ", p).strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------- VLM


def tile_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Lay frames out in a near-square grid: one image that shows the clip's progression to an image captioner."""
    cols = int(np.ceil(np.sqrt(len(frames))))
    rows = int(np.ceil(len(frames) / cols))
    h, w, c = frames[0].shape
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, frame in enumerate(frames):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = frame
    return grid


class VlmCaptioner:
    """A transformers image-text-to-text model (BLIP-style captioner or chat VLM), loaded once per worker."""

    def __init__(self, model: str, device: str):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.device = device
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.lock = threading.Lock()  # shared by a worker's threads; tokenizers are not re-entrant

    def caption(
        self, clips: list[list[np.ndarray]], prompt: str | None, max_new_tokens: int, batch_size: int
    ) -> list[str]:
        from PIL import Image

        captions: list[str] = []
        for start in range(0, len(clips), batch_size):
            images = [Image.fromarray(tile_frames(frames)) for frames in clips[start : start + batch_size]]
            with self.lock:
                captions += self._generate(images, prompt, max_new_tokens)
        return captions

    def _generate(self, images, prompt: str | None, max_new_tokens: int) -> list[str]:
        if self.chat:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or CHAT_PROMPT}]}
            ]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt")
        elif prompt:
            inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and out.shape[1] > prompt_ids.shape[1]
            and self.torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            out = out[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
        return [tidy_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
