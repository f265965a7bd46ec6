"""Make ``count`` distinct real-photo-sized JPEGs from a few real photos: random crops, scales, qualities.

    python bench/gpu/make_photos.py .whl/photos /tmp/photos 50000

Each output is a crop of 55-100% of a source, scaled to 400-1280 px on its long
side and re-encoded at quality 70-95: as costly to decode as the photos they
come from, and all different bytes (no dedup). Runs on all cores.
"""

from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

_sources: list[Image.Image] = []


def _load(folder: str) -> None:
    for path in sorted(Path(folder).glob("*.jpg")):
        with Image.open(path) as im:
            _sources.append(im.convert("RGB"))


def _make(job: tuple[int, str]) -> None:
    n, out = job
    rng = np.random.default_rng(n)
    im = _sources[n % len(_sources)]
    share = rng.uniform(0.55, 1.0)
    w, h = int(im.width * share), int(im.height * share)
    x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
    crop = im.crop((x, y, x + w, y + h))
    long_side = int(rng.integers(400, 1281))
    scale = long_side / max(w, h)
    crop = crop.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
    Path(out, f"{n:06d}.jpg").write_bytes(buf.getvalue())


def main() -> None:
    sources, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Path(out).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count(), initializer=_load, initargs=(sources,)) as pool:
        list(pool.map(_make, [(n, out) for n in range(count)], chunksize=256))
    print(f"{count} photos in {out}")


if __name__ == "__main__":
    main()
