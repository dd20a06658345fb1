"""OUTPUT/report.html: every manifest row on one self-contained page, read back from the session's curate run and
loaded in a real headless browser."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from vidtune.evaluation.report import print_curate_summary
from vidtune.tasks.filters import FilterParams, apply_filters
from vidtune.tasks.manifest import read_manifest
from vidtune.tasks.output import OutputLayout
from vidtune.tasks.records import ClipRecord, Status
from vidtune.tasks.report import contact_sheet, report_html, write_report
from vidtune.tasks.synthetic_videos import render_video

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)"
)
SHEET = re.compile(r'src="data:image/jpeg;base64,')


def open_in_browser(url: str, profile: Path) -> tuple[str, list[str]]:
    """(the DOM once the page's script has run, every console message the page printed: uncaught errors, CSP
    violations, failed loads and console.* calls all reach Chromium's log as CONSOLE lines)."""
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(
        [BROWSER, *args, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=60
    )
    return done.stdout, [line for line in done.stderr.splitlines() if re.search(r":CONSOLE\b", line)]


def shown(dom: str) -> int | None:
    """The count of visible rows the page's script wrote on <body> (None: the script did not get that far)."""
    match = re.search(r'<body[^>]*\bdata-shown="(\d+)"', dom)
    return int(match.group(1)) if match else None


def test_the_curate_run_writes_a_report_of_every_row_and_links_it(curated):
    output, summary, _ = curated
    rows, page = read_manifest(output / "manifest.parquet"), (output / "report.html").read_text()
    assert not re.search(r"https?://", page)  # self-contained: no CDN, no remote images
    assert page.count("<tr class=") == len(rows)
    for row in rows:  # clips by id, source rows (failed, filtered, duplicate) by their reason
        assert (row.clip_id or html.escape(row.reason)) in page
    assert len(SHEET.findall(page)) == sum(bool(r.clip_id) for r in rows)
    # Curation staged each sheet from the frames its scores read: the page embeds those, no clip is decoded again.
    staging = OutputLayout(output).staging
    staged = {r.clip_id: staging / str(r.source_sha256) / f"{r.clip_id}.sheet.jpg" for r in rows}
    staged = {clip_id: path.read_bytes() for clip_id, path in staged.items() if clip_id and path.is_file()}
    assert len(staged) == sum(r.status == Status.KEPT for r in rows if r.clip_id) > 0
    assert all(base64.b64encode(sheet).decode() in page for sheet in staged.values())
    # The CLI summary and the curate-summary artifact (the same markdown) link it.
    console = Console(file=io.StringIO(), width=400)
    print_curate_summary(summary, console)
    assert summary["report"] == str(output / "report.html")
    assert (output / "report.html").as_uri() in console.file.getvalue()


@pytest.fixture(scope="module")
def refiltered(curated, tmp_path_factory) -> tuple[Path, list[ClipRecord]]:
    """The session's dataset copied and filtered again (the real filter, motion threshold at the median) so that
    clips are kept and filtered; one kept clip's staged MP4 is gone (its shard has it) and one filtered clip's
    too (nothing has it). Returns (report.html, rows)."""
    output, _, _ = curated
    layout = OutputLayout(tmp_path_factory.mktemp("refiltered") / "dataset")
    shutil.copytree(output, layout.root)
    rows = read_manifest(layout.manifest)
    motions = sorted(r.motion_score for r in rows if r.motion_score is not None)
    rows = apply_filters(rows, FilterParams(min_motion=motions[len(motions) // 2]))
    rows = [dataclasses.replace(r, shard=None) if r.status != Status.KEPT else r for r in rows]
    for status in (Status.KEPT, Status.FILTERED):
        gone = next(r for r in rows if r.clip_id and r.status == status)
        for staged in (f"{gone.clip_id}.mp4", f"{gone.clip_id}.sheet.jpg"):
            (layout.staging / gone.source_sha256 / staged).unlink()
    return write_report(rows, layout), rows


def test_kept_and_filtered_clips_have_sheets_and_a_missing_video_a_placeholder(refiltered):
    path, rows = refiltered
    page = path.read_text()
    assert {Status.KEPT, Status.FILTERED, Status.FAILED} <= {r.status for r in rows}
    assert page.count("<tr class=") == len(rows)
    assert len(SHEET.findall(page)) == sum(bool(r.clip_id) for r in rows) - 1  # the kept one read from its shard
    assert page.count(">no video<") == 1 and page.count(">whole source<") == sum(not r.clip_id for r in rows)
    for row in rows:
        if row.status == Status.FILTERED:
            assert html.escape(row.reason) in page


def test_contact_sheet_tiles_evenly_spaced_frames(tmp_path):
    video = render_video(tmp_path / "v.mp4", seconds=2.0, fps=8, width=64, height=48, shots=2)
    sheet = Image.open(io.BytesIO(contact_sheet(video.path, frames=4, height=96)))
    assert sheet.format == "JPEG" and sheet.size == (4 * 128, 96)
    first, last = sheet.crop((0, 0, 128, 96)), sheet.crop((384, 0, 512, 96))
    assert first.tobytes() != last.tobytes()  # two shots: the first and last frames differ


def page_with_hostile_caption() -> tuple[str, list[ClipRecord]]:
    rows = [
        ClipRecord("c1", "/in/a <b>.mp4", "aa", caption='<script>alert("x")</script> & "quotes"', clip_score=0.3),
        ClipRecord("c2", "/in/a <b>.mp4", "aa", status=Status.FILTERED, reason="low motion: 0.1 < 0.5"),
        ClipRecord(None, "/in/bad.mp4", None, status=Status.FAILED, reason="unreadable: <moov> missing"),
    ]
    return report_html(rows, {}, title="test"), rows


def test_text_from_the_data_is_escaped():
    page, _ = page_with_hostile_caption()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert '<script>alert("x")' not in page and "<moov>" not in page and "a <b>" not in page
    assert page.count('class="none"') == 3  # no sheet: a placeholder each, not an error


@needs_browser
def test_the_report_loads_in_a_browser_with_every_row_and_no_console_message(refiltered, tmp_path):
    path, rows = refiltered
    dom, console = open_in_browser(path.as_uri(), tmp_path / "profile")
    assert console == [] and shown(dom) == len(rows)
    kept = next(r for r in rows if r.status == Status.KEPT)
    dom, console = open_in_browser(f"{path.as_uri()}?q={kept.clip_id}", tmp_path / "profile")  # the search filters
    assert console == [] and shown(dom) == 1


@needs_browser
def test_a_hostile_caption_stays_text_in_the_browser(tmp_path):
    page, rows = page_with_hostile_caption()
    (tmp_path / "report.html").write_text(page)
    dom, console = open_in_browser((tmp_path / "report.html").as_uri(), tmp_path / "profile")
    assert console == [] and shown(dom) == len(rows)
    assert "&lt;script&gt;alert" in dom and "<script>alert" not in dom


@needs_browser
def test_the_browser_check_sees_a_script_error(tmp_path):
    """The console check can fail: the page's script made to throw is reported, and the page is not marked."""
    page, _ = page_with_hostile_caption()
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"<meta http-equiv[^>]*>", "", page).replace("update();\n</script>", "null.x;\n</script>"))
    dom, console = open_in_browser(broken.as_uri(), tmp_path / "profile")
    assert any("Uncaught TypeError" in line for line in console) and shown(dom) is None
