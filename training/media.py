"""Reading clips back (decord, with PyAV where decord cannot) and writing rendered samples: H.264 MP4 (PyAV) and
GIF (Pillow), each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vidtune.training.files import atomic_path


class FrameReader:
    """Random access to a clip's frames (a path or MP4 bytes), opened once. decord seeks fastest; for some small
    frame widths (16, 24, 48, 72 pixels) it fails copying padded rows ("The size must exactly match"), and PyAV,
    which decodes every frame up to the last one wanted, reads those instead."""

    def __init__(self, video: str | Path | bytes):
        import decord

        self.video = video
        self.reader = decord.VideoReader(self._source(), num_threads=0)  # 0 = decord picks; ~40% faster than 1 here

    def _source(self):
        return io.BytesIO(self.video) if isinstance(self.video, bytes) else str(self.video)

    def __len__(self) -> int:
        return len(self.reader)

    def get(self, indices: list[int]) -> np.ndarray:
        """The frames at `indices`, in that order, as uint8 (n, h, w, 3)."""
        import decord

        try:
            return self.reader.get_batch(list(indices)).asnumpy()
        except decord.DECORDError as exc:
            if "must exactly match" not in str(exc):
                raise
        wanted, frames = set(indices), {}
        with av.open(self._source()) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if len(frames) == len(wanted):
                    break
        return np.stack([frames[i] for i in indices])


def read_image(path: str | Path, setting: str = "image") -> Image.Image:
    """A conditioning image as RGB, or a ValueError naming `setting` and the file."""
    from PIL import UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{setting}: {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(
            f"{setting}: {path} is not an image file this machine can read ({type(exc).__name__})"
        ) from exc


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(frames, h, w, 3) floats in [0, 1] -> uint8."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """uint8 (frames, h, w, 3) -> H.264 MP4; odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def write_gif(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return Path(path)
