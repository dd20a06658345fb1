"""OUTPUT/report.html: every manifest row on one self-contained page (a contact sheet of each clip, its caption,
scores, status and reason), filterable in the browser with no network access."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import os
import tarfile
import typing
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
from PIL import Image

from vidtune.tasks.files import atomic_path
from vidtune.tasks.manifest import reason_kind
from vidtune.tasks.output import OutputLayout
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.scoring import evenly_spaced

log = logging.getLogger(__name__)

# Every optional float of a manifest row is a score: new score columns appear on the page with no edit here.
SCORE_COLUMNS = [name for name, kind in typing.get_type_hints(ClipRecord).items() if kind == float | None]


SHEET_FRAMES, SHEET_HEIGHT, SHEET_QUALITY = 4, 96, 70


def sheet_path(clip_dir: Path, clip_id: str) -> Path:
    """Where curation stages a clip's contact sheet, made from the frames the scores read (no second decode)."""
    return clip_dir / f"{clip_id}.sheet.jpg"


def tile_sheet(images: list[Image.Image], height: int = SHEET_HEIGHT, quality: int = SHEET_QUALITY) -> bytes:
    """`images` scaled to `height` px and set side by side in one JPEG."""
    width = max(1, round(images[0].width * height / images[0].height))
    sheet = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        sheet.paste(image.resize((width, height), Image.Resampling.BILINEAR), (i * width, 0))
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=quality)
    return out.getvalue()


def contact_sheet(video: Path | typing.IO[bytes], frames: int = SHEET_FRAMES, height: int = SHEET_HEIGHT) -> bytes:
    """`frames` evenly spaced frames of `video`, `height` px tall, side by side in one JPEG."""
    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = set(evenly_spaced(stream.frames, frames)) if stream.frames else None  # None: frame count unknown
        images = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if wanted is None or i in wanted]
    if not images:
        raise ValueError("no frame decoded")
    return tile_sheet([images[i] for i in evenly_spaced(len(images), frames)], height)


def _clip_video(row: ClipRecord, layout: OutputLayout) -> Path | io.BytesIO | None:
    """The clip's MP4: staged (kept and filtered clips), else its shard member; None when it was never written."""
    staged = layout.staging / str(row.source_sha256) / f"{row.clip_id}.mp4"
    if staged.is_file():
        return staged
    if row.shard and (layout.shards / row.shard).is_file():
        with tarfile.open(layout.shards / row.shard) as tar:
            return io.BytesIO(tar.extractfile(f"{row.clip_id}.mp4").read())
    return None


def _sheet_or_none(row: ClipRecord, layout: OutputLayout) -> bytes | None:
    staged = sheet_path(layout.staging / str(row.source_sha256), row.clip_id)
    if staged.is_file():
        return staged.read_bytes()
    try:
        video = _clip_video(row, layout)
        return contact_sheet(video) if video is not None else None
    except (av.error.FFmpegError, OSError, KeyError, IndexError, ValueError) as exc:  # a placeholder, not a failure
        log.warning("no thumbnails for clip %s: %s", row.clip_id, exc)
        return None


def write_report(
    rows: list[ClipRecord], layout: OutputLayout, report: Callable[[int], None] = lambda done: None
) -> Path:
    """Every clip's contact sheet (the staged one, else decoded from the clip, in threads: PyAV decodes without the
    GIL), then `report.html`.
    `report(done)` is called as sheets finish (a progress artifact)."""
    clips = [r for r in rows if r.clip_id]
    sheets = {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for done, (row, sheet) in enumerate(zip(clips, pool.map(lambda r: _sheet_or_none(r, layout), clips)), 1):
            if sheet is not None:
                sheets[row.clip_id] = sheet
            report(done)
    path = layout.root / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(report_html(rows, sheets, title=f"vidtune curate: {layout.root}"), encoding="utf-8")
    return path


def report_html(rows: list[ClipRecord], sheets: dict[str, bytes], title: str) -> str:
    """The page: one table row per manifest row (in manifest order, so a source's kept and filtered clips sit
    together), filter controls, and the script that filters. Every value from the data is escaped."""
    e = html.escape
    scores = [c for c in SCORE_COLUMNS if any(getattr(r, c) is not None for r in rows)]
    statuses = Counter(Status(r.status).value for r in rows)
    reasons = Counter(reason_kind(r.reason) for r in rows if r.status != Status.KEPT)
    sizes = Counter(_size(r) for r in rows)
    checkboxes = "".join(
        f'<label><input type="checkbox" class="status" value="{s.value}" checked> {s.value} ({statuses[s.value]})</label>'
        for s in Status
    )
    head = "".join(f"<th>{e(c)}</th>" for c in ["frames", "clip", "size", "caption", *scores, "status", "reason"])
    body = "\n".join(_row_html(r, sheets.get(r.clip_id or ""), scores) for r in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_script_hash()}'">
<title>{e(title)}</title><style>{_CSS}</style></head>
<body><h1>{e(title)}</h1>
<form id="filters">{checkboxes}
<select id="reason"><option value="">any reason</option>{_options(reasons)}</select>
<select id="size"><option value="">any size</option>{_options(sizes)}</select>
<input id="search" type="search" placeholder="search caption, source, clip id">
<span><b id="shown">{len(rows)}</b> of {len(rows)} rows shown</span></form>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<script>{_SCRIPT}</script></body></html>
"""


def _row_html(row: ClipRecord, sheet: bytes | None, scores: list[str]) -> str:
    e = html.escape
    status = Status(row.status).value
    if sheet is not None:
        frames = (
            f'<img src="data:image/jpeg;base64,{base64.b64encode(sheet).decode()}" alt="frames of {e(row.clip_id)}">'
        )
    else:
        frames = f'<div class="none">{"no video" if row.clip_id else "whole source"}</div>'
    where = f"{row.start_s:.2f}–{row.end_s:.2f} s" if row.clip_id else "no clip"
    clip = f'<span title="{e(row.source)}">{e(Path(row.source).name)}</span><br>{where}'
    clip += f"<br><code>{e(row.clip_id)}</code>" if row.clip_id else ""
    clip += f" ({e(row.media)})" if row.media != "video" else ""
    score_cells = "".join(f"<td>{_number(getattr(row, c))}</td>" for c in scores)
    search = " ".join([row.caption, row.source, row.clip_id or ""]).lower()
    reason = reason_kind(row.reason) if status != Status.KEPT.value else ""
    return (
        f'<tr class="{status}" data-status="{status}" data-reason="{e(reason)}" data-size="{e(_size(row))}"'
        f' data-text="{e(search)}"><td>{frames}</td><td>{clip}</td><td>{e(_size(row))}</td><td>{e(row.caption)}</td>'
        f"{score_cells}<td>{status}</td><td>{e(row.reason)}</td></tr>"
    )


def _size(row: ClipRecord) -> str:
    """A clip's size bucket; a source row carries the source's own size, labelled so it is not taken for one."""
    if not row.width:
        return "unknown"
    return f"{row.width}x{row.height}" if row.clip_id else f"{row.width}x{row.height} (source)"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _options(counts: Counter) -> str:
    return "".join(
        f'<option value="{html.escape(k)}">{html.escape(k)} ({n})</option>' for k, n in sorted(counts.items())
    )


def _script_hash() -> str:
    """The CSP allows this page's own script and nothing else (an injected one would not run)."""
    return base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()


_CSS = """
body { font: 13px system-ui, sans-serif; margin: 1em; }
form { position: sticky; top: 0; background: #fff; padding: .5em 0; display: flex; gap: 1em; flex-wrap: wrap; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #ddd; padding: 4px 6px; vertical-align: top; }
th { text-align: left; } td:nth-child(2) { white-space: nowrap; } td:nth-child(4) { max-width: 28em; } img { display: block; height: 96px; }
tr.kept { background: #f0fdf4; } tr.filtered { background: #fefce8; } tr.failed { background: #fef2f2; }
.none { width: 96px; height: 96px; background: #eee; color: #888; display: grid; place-items: center; }
"""

# Reads only the rows' data attributes and writes only counts: no data reaches innerHTML.
_SCRIPT = """
const rows = Array.from(document.querySelectorAll("tbody tr"));
const form = document.getElementById("filters");
function update() {
  const statuses = new Set(Array.from(form.querySelectorAll(".status:checked"), (box) => box.value));
  const reason = document.getElementById("reason").value;
  const size = document.getElementById("size").value;
  const text = document.getElementById("search").value.trim().toLowerCase();
  let shown = 0;
  for (const row of rows) {
    const d = row.dataset;
    row.hidden = !(statuses.has(d.status) && (!reason || d.reason === reason) && (!size || d.size === size)
      && (!text || d.text.includes(text)));
    shown += !row.hidden;
  }
  document.getElementById("shown").textContent = shown;
  document.body.dataset.shown = shown;
}
document.getElementById("search").value = new URLSearchParams(location.search).get("q") || "";  // report.html?q=...
form.addEventListener("input", update);
form.addEventListener("submit", (event) => event.preventDefault());
update();
"""
