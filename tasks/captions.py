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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vidtune.tasks.records import ClipRecord
from vidtune.tasks.scoring import evenly_spaced

log = logging.getLogger(__name__)
TEMPLATE_FIELDS = ("trigger", "sidecar", "vlm", "source_name", "start_s", "end_s", "duration_s")
DEFAULT_TEMPLATES = {
    "sidecar": "{trigger}, {sidecar}",
    "template": "{trigger}, {source_name}",
    "vlm": "{trigger}, {vlm}",
}
CHAT_PROMPT = "Describe this video in one sentence."
GRID_MAX_FRAMES = 16  # an image captioner sees one grid: beyond 4x4 the frames get too small to read
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
    vlm_frames: int = Field(
        4,
        ge=1,
        le=32,
        description="Frames per clip given to the VLM: a video VLM (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, ...) gets "
        f"them as a video with their timing; an image captioner gets at most {GRID_MAX_FRAMES} tiled into one image.",
    )
    vlm_max_new_tokens: int = Field(
        40,
        ge=1,
        le=1024,
        description="Longest caption the VLM may write, in tokens; kept whole in the manifest and shards (training's "
        "text encoder reads up to its own maximum length).",
    )
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


@dataclass(frozen=True)
class ClipFrames:
    """A clip's evenly spaced frames (first to last, H x W x 3 uint8) and the clip they were taken from:
    `num_frames` frames at `fps`. A video VLM places the frames in time from these."""

    frames: list[np.ndarray]
    num_frames: int
    fps: float

    def video_metadata(self) -> dict:
        """transformers' VideoMetadata fields: the sampled frames' indices into the clip give their timestamps, and
        count / clip length gives their rate (Qwen2.5-VL's `second_per_grid_ts` = temporal patch / that rate)."""
        last = max(self.num_frames - 1, 0)
        indices = np.linspace(0, last, len(self.frames)).round().astype(int).tolist()
        fps = self.fps if self.fps > 0 else None
        duration = self.num_frames / fps if fps else None
        return {"total_num_frames": self.num_frames, "fps": fps, "frames_indices": indices, "duration": duration}


class VlmCaptioner:
    """A transformers image-text-to-text model, loaded once per worker. A chat VLM whose processor takes videos
    (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, ...) is given each clip's frames as a video; an image captioner
    (BLIP-style or an image-only chat VLM) one grid image of them."""

    def __init__(self, model: str, device: str):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.device = device
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.video = self.chat and getattr(self.processor, "video_processor", None) is not None
        if self.chat:  # decoder-only: a batch's shorter prompts are padded on the left, next to the answer
            self.processor.tokenizer.padding_side = "left"
        self.lock = threading.Lock()  # shared by a worker's threads; tokenizers are not re-entrant

    def caption(self, clips: list[ClipFrames], prompt: str | None, max_new_tokens: int, batch_size: int) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(clips), batch_size):
            batch = clips[start : start + batch_size]
            as_video = self.video and all(c.num_frames > 1 for c in batch)  # a still goes in as the image it is
            with self.lock:
                inputs = self._video_inputs(batch, prompt) if as_video else self._grid_inputs(batch, prompt)
                captions += self._generate(inputs.to(self.device), max_new_tokens)
        return captions

    def _chat_text(self, kind: str, prompt: str | None) -> str:
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt or CHAT_PROMPT}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _video_inputs(self, clips: list[ClipFrames], prompt: str | None):
        """Each clip as a T x H x W x 3 video with its timing. Frames are already sampled (no resampling here); a
        model that patches frames in pairs (Qwen2-VL's temporal_patch_size 2) gets the last frame repeated, while
        the timing stays that of the frames actually sampled."""
        step = getattr(self.processor.video_processor, "temporal_patch_size", None) or 1
        videos = [np.stack(c.frames + c.frames[-1:] * (-len(c.frames) % step)) for c in clips]
        return self.processor(
            text=[self._chat_text("video", prompt)] * len(clips),
            videos=videos,
            video_metadata=[c.video_metadata() for c in clips],
            do_sample_frames=False,
            padding=True,
            return_tensors="pt",
        )

    def _grid_inputs(self, clips: list[ClipFrames], prompt: str | None):
        from PIL import Image

        images = [
            Image.fromarray(tile_frames([c.frames[i] for i in evenly_spaced(len(c.frames), GRID_MAX_FRAMES)]))
            for c in clips
        ]
        if self.chat:
            text = [self._chat_text("image", prompt)] * len(images)
            return self.processor(images=images, text=text, padding=True, return_tensors="pt")
        if prompt:
            return self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        return self.processor(images=images, return_tensors="pt")

    def _generate(self, inputs, max_new_tokens: int) -> list[str]:
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
