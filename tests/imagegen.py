"""Images made in code, for tests that must not depend on ../shared/data."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (160, 120), mode: str = "RGB") -> Image.Image:
    """A smooth random picture: distinct per seed, like a photo rather than noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    channels = []
    for _ in range(3):
        a, b, c, d = rng.uniform(1, 8, 4)
        channels.append(127 + 120 * np.sin(a * xx * 3.1 + b) * np.cos(c * yy * 3.1 + d))
    rgb = Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8), "RGB")
    return rgb.convert(mode) if mode != "RGB" else rgb


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def write_photo_set(folder: Path, count: int = 12) -> list[Path]:
    paths = []
    for seed in range(count):
        path = folder / f"generated_{seed:02d}.jpg"
        path.write_bytes(encode(pattern(seed), "JPEG", quality=90))
        paths.append(path)
    good = encode(pattern(99), "JPEG")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "not_image.jpg").write_bytes(b"hello\n")
    return paths


def pattern_folder(folder: Path, seeds: Iterable[int], fmt: str = "JPEG", name: str = "{seed}") -> Path:
    """A new folder of distinct pictures, one per seed, named by ``name`` (a format with {seed})."""
    folder.mkdir(parents=True)
    ext = "jpg" if fmt == "JPEG" else fmt.lower()
    for seed in seeds:
        (folder / f"{name.format(seed=seed)}.{ext}").write_bytes(encode(pattern(seed), fmt))
    return folder
