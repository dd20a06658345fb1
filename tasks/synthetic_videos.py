"""Synthetic raw videos with known scene boundaries, for tests, the demo and benchmarks.

Each video is a sequence of shots (textured backgrounds that pan like a camera, moving shapes, film grain),
joined by hard cuts and, where asked, a fade through black or a cross-dissolve. The generator returns the
ground truth (cut frames and gradual-transition ranges) so scene detection can be scored against it.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

TRANSITIONS = ("cut", "fade", "dissolve")


@dataclass(frozen=True)
class SyntheticVideo:
    """A generated video and its ground truth, in decoded-frame indices."""

    path: Path
    fps: float
    num_frames: int
    width: int
    height: int
    cuts: list[int] = field(default_factory=list)  # first frame of each shot that follows a hard cut
    transitions: list[tuple[int, int]] = field(default_factory=list)  # inclusive frame ranges of fades/dissolves
    rotation: int = 0
    vfr: bool = False
    bars: tuple[int, int, int, int] = (0, 0, 0, 0)  # black (left, top, right, bottom) in pixels
    bars_from: int = 0  # first frame with the bars

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


class _Shot:
    """One shot: a panning texture with moving shapes, rendered frame by frame."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, hue: float, motion: float = 1.0):
        self.width, self.height = width, height
        pad_x, pad_y = width // 2, height // 2
        coarse = rng.random((max(2, (height + pad_y) // 48), max(2, (width + pad_x) // 48), 3))
        smooth = np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((width + pad_x, height + pad_y), Image.BICUBIC),
            dtype=np.float32,
        )
        base = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.8), dtype=np.float32) * 255
        self.texture = np.clip(base * 0.75 + (smooth - 128) * 0.5, 0, 255).astype(np.float32)
        self.pan = rng.uniform(-1, 1, size=2) * np.array([pad_x, pad_y]) / 120 * motion  # px per frame
        self.origin = np.array([pad_x / 2, pad_y / 2])
        self.pad = np.array([pad_x, pad_y])
        n_shapes = int(rng.integers(2, 5))
        self.shapes = [
            dict(
                pos=rng.uniform(0.2, 0.8, 2) * [width, height],
                vel=rng.uniform(-1, 1, 2) * min(width, height) / 80 * motion,
                radius=rng.uniform(0.05, 0.12) * min(width, height),
                color=np.array(colorsys.hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, 0.9, 0.95)) * 255,
                square=bool(rng.integers(0, 2)),
            )
            for _ in range(n_shapes)
        ]
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def render(self, t: int, grain: np.ndarray) -> np.ndarray:
        off = np.clip(self.origin + self.pan * t, 0, self.pad).astype(int)
        frame = self.texture[off[1] : off[1] + self.height, off[0] : off[0] + self.width].copy()
        for shape in self.shapes:
            cx, cy = shape["pos"] + shape["vel"] * t
            cx, cy = cx % self.width, cy % self.height
            r = shape["radius"]
            if shape["square"]:
                mask = (np.abs(self.xx - cx) < r) & (np.abs(self.yy - cy) < r)
            else:
                mask = (self.xx - cx) ** 2 + (self.yy - cy) ** 2 < r * r
            frame[mask] = shape["color"]
        return np.clip(frame + grain, 0, 255).astype(np.uint8)


def _plan_shots(
    num_frames: int, shot_lengths: list[int], transition: str, transition_frames: int
) -> tuple[list[tuple[int, int, float]], list[int], list[tuple[int, int]]]:
    """Frame -> (shot a, shot b, mix of b) plan plus the ground truth; the first non-cut boundary gets `transition`."""
    cuts: list[int] = []
    gradual: list[tuple[int, int]] = []
    plan: list[tuple[int, int, float]] = []
    starts = np.cumsum([0, *shot_lengths])[:-1]
    for shot, start in enumerate(starts):
        end = min(start + shot_lengths[shot], num_frames)
        plan.extend((shot, shot, 0.0) for _ in range(start, end))
        if shot == 0:
            continue
        if transition != "cut" and not gradual and shot == 1:
            a, b = start - transition_frames // 2, start + transition_frames // 2 - 1
            gradual.append((int(a), int(b)))
            for i in range(a, b + 1):
                mix = (i - a + 1) / (b - a + 2)
                plan[i] = (shot - 1, shot, mix)
        else:
            cuts.append(int(start))
    return plan[:num_frames], cuts, gradual


def render_video(
    path: str | Path,
    *,
    seconds: float = 6.0,
    fps: float = 25.0,
    width: int = 320,
    height: int = 240,
    shots: int = 3,
    transition: str = "cut",
    transition_frames: int = 16,
    rotation: int = 0,
    vfr: bool = False,
    grain: float = 4.0,
    motion: float = 1.0,
    crf: int = 18,
    preset: str = "ultrafast",
    bars: tuple[int, int, int, int] = (0, 0, 0, 0),
    bars_from: int = 0,
    brightness: float = 1.0,
    vignette: bool = False,
    seed: int = 0,
) -> SyntheticVideo:
    """Render a video of `shots` shots to `path` (.mp4 via PyAV/H.264, .gif via Pillow) and return its ground truth.

    The first boundary uses `transition` ("cut", "fade" through black, or "dissolve"); the rest are hard cuts.
    `vfr=True` writes irregular frame durations (a mix of 1/fps and 1.5/fps), as phones and screen recorders do.
    `motion` scales camera pans and object speeds (0 = a locked-off, static shot with only sensor grain).
    `crf`/`preset` set the x264 encode (camera-like files: crf 23, preset veryfast).
    `bars` (left, top, right, bottom) blacks out borders from frame `bars_from` on (letterbox, pillarbox,
    windowbox, or a matte that appears mid-video). `brightness` < 1 and `vignette` (picture falling off to black
    towards the borders) make a dark scene, the kind that must not pass for bars.
    """
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    num_frames = int(round(seconds * fps))
    # Shot lengths vary (0.6x to 1.4x the mean) so cuts do not land on a regular grid.
    weights = rng.uniform(0.6, 1.4, shots)
    lengths = np.maximum(1, np.round(weights / weights.sum() * num_frames)).astype(int)
    lengths[-1] = max(1, num_frames - lengths[:-1].sum())
    plan, cuts, gradual = _plan_shots(num_frames, list(lengths), transition, transition_frames)
    hues = (rng.uniform(0, 1) + np.arange(shots) * 0.381966) % 1.0  # golden-ratio hue steps: neighbours differ
    scenes = [_Shot(rng, width, height, hue, motion) for hue in hues]
    grain_tiles = [rng.normal(0, grain, (height, width, 1)).astype(np.float32) for _ in range(4)]
    shot_start = {s: int(np.sum(lengths[:s])) for s in range(shots)}
    light = _light_mask(width, height, brightness, vignette)

    def frame_at(i: int) -> np.ndarray:
        image = mixed_frame_at(i)
        if light is not None:
            image = (image * light).astype(np.uint8)
        if i >= bars_from and any(bars):
            left, top, right, bottom = bars
            image = image.copy()
            image[:top], image[height - bottom :], image[:, :left], image[:, width - right :] = 0, 0, 0, 0
        return image

    def mixed_frame_at(i: int) -> np.ndarray:
        a, b, mix = plan[i]
        g = grain_tiles[i % len(grain_tiles)]
        img_a = scenes[a].render(i - shot_start[a], g)
        if mix == 0.0:
            return img_a
        img_b = scenes[b].render(i - shot_start[b], g).astype(np.float32)
        if transition == "fade":  # out to black over the first half, in from black over the second
            level = abs(1 - 2 * mix)
            return ((img_a if mix < 0.5 else img_b) * level).astype(np.uint8)
        return (img_a * (1 - mix) + img_b * mix).astype(np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        _write_gif(path, (frame_at(i) for i in range(num_frames)), fps)
    else:
        _write_mp4(path, (frame_at(i) for i in range(num_frames)), fps, width, height, rotation, vfr, rng, crf, preset)
    return SyntheticVideo(path, fps, num_frames, width, height, cuts, gradual, rotation, vfr, tuple(bars), bars_from)


def _light_mask(width: int, height: int, brightness: float, vignette: bool) -> np.ndarray | None:
    """Per-pixel light (height, width, 1): `brightness` everywhere, falling smoothly to 0 at the borders with
    `vignette`; None when the picture is left as it is."""
    if brightness == 1.0 and not vignette:
        return None
    light = np.full((height, width), brightness, np.float32)
    if vignette:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        distance = np.maximum(np.abs(xx / (width - 1) - 0.5), np.abs(yy / (height - 1) - 0.5)) * 2  # 0 centre, 1 edge
        light *= np.clip((1 - distance) / 0.5, 0, 1) ** 2
    return light[..., None]


def _write_mp4(path, frames, fps, width, height, rotation, vfr, rng, crf, preset) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "crf": str(crf)}
        if rotation:
            stream.set_display_rotation(rotation)
        time_base = Fraction(1, 1000) if vfr else None
        if vfr:
            stream.codec_context.time_base = time_base
        pts_ms = 0.0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = int(round(pts_ms)), time_base
                pts_ms += 1000 / fps * (1.5 if rng.random() < 0.3 else 1.0)
            else:
                frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_gif(path, frames, fps) -> None:
    images = [Image.fromarray(f).quantize(colors=128) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)


def make_raw_video_set(folder: str | Path, *, seed: int = 0, seconds: float = 6.0) -> list[SyntheticVideo]:
    """The standard messy mix: 24/25/30 fps, a VFR phone clip, an odd 1278x718 size, rotation metadata,
    a fade through black, a cross-dissolve, and an animated GIF."""
    folder = Path(folder)
    specs = [
        dict(name="street 24fps.mp4", fps=24, width=320, height=240, shots=3, transition="cut"),
        dict(name="beach_25fps.mp4", fps=25, width=320, height=192, shots=3, transition="fade"),
        dict(name="night-30fps.mp4", fps=30, width=256, height=256, shots=4, transition="dissolve"),
        dict(name="phone_vfr.mp4", fps=30, width=240, height=320, shots=3, vfr=True),
        dict(name="odd size 1278x718.mp4", fps=25, width=1278, height=718, shots=3, seconds=min(seconds, 4.0)),
        dict(name="rotated_90.mp4", fps=25, width=320, height=240, shots=3, rotation=90),
        dict(name="loop.gif", fps=10, width=160, height=120, shots=2, seconds=min(seconds, 4.0)),
    ]
    videos = []
    for i, spec in enumerate(specs):
        spec = {"seconds": seconds, **spec}
        name = spec.pop("name")
        videos.append(render_video(folder / name, seed=seed * 100 + i, **spec))
    return videos


def score_cuts(
    detected: list[int], truth: list[int], transitions: list[tuple[int, int]] = (), tolerance: int = 1
) -> tuple[float, float, float]:
    """Precision, recall and F1 of detected hard cuts; each truth cut matches at most one detection within
    `tolerance` frames. A detection inside a known fade/dissolve found that boundary: it is not counted."""

    def inside(f):
        return any(a - tolerance <= f <= b + tolerance for a, b in transitions)

    detected = sorted(f for f in detected if not inside(f))
    unmatched = sorted(truth)
    hits = 0
    for cut in detected:
        match = next((t for t in unmatched if abs(t - cut) <= tolerance), None)
        if match is not None:
            unmatched.remove(match)
            hits += 1
    precision = hits / len(detected) if detected else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1
