"""JPEG decode + squash to 224: Pillow's draft mode (pupyl_queue.images) against faster libraries.

A candidate replaces Pillow only if it is faster and gives the same pixels. Each
figure is the median of --runs passes in one process (one core), the paths
interleaved so machine noise hits them alike. Only plain RGB JPEGs without EXIF
rotation are measured: the only ones any reduced decode applies to. Every path
hashes and sniffs the bytes as decode() must (the same work around the decoder).

    .venv/bin/python bench/jpeg_paths.py          # needs: pip install simplejpeg opencv-python-headless

Candidates: simplejpeg (libjpeg-turbo) at Pillow's DCT scales (1/2, 1/4, 1/8),
simplejpeg at libjpeg-turbo's finer M/8 scales, and OpenCV's reduced reads
(IMREAD_REDUCED_COLOR_2/4/8), each followed by Pillow's bilinear squash, plus
OpenCV's own INTER_AREA resize.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from pupyl_queue.images import decode  # noqa: E402

SIZE = 224


def pillow_draft(data: bytes) -> np.ndarray:
    return decode(data, 10**9, target=SIZE).pixels(SIZE)


def _squash(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def _checks(data: bytes) -> None:
    """What decode() does whatever the decoder: hash, sniff, size and EXIF checks (a fair comparison)."""
    hashlib.sha256(data).hexdigest()
    Image.open(io.BytesIO(data)).getexif()


def _pillow_scale(width: int, height: int) -> int:
    return next(s for s in (8, 4, 2, 1) if s == 1 or min(width // s, height // s) >= SIZE)


def simplejpeg_pillow_scales(data: bytes) -> np.ndarray:
    _checks(data)
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    s = _pillow_scale(width, height)
    return _squash(simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // s), min_width=-(-width // s)))


def simplejpeg_m8_scales(data: bytes) -> np.ndarray:
    _checks(data)
    import simplejpeg

    return _squash(simplejpeg.decode_jpeg(data, "RGB", min_height=SIZE, min_width=SIZE))


def _opencv_reduced(data: bytes) -> np.ndarray:
    import cv2

    width, height = Image.open(io.BytesIO(data)).size
    flags = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
    flag = flags.get(_pillow_scale(width, height), cv2.IMREAD_COLOR)
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def opencv_reduced(data: bytes) -> np.ndarray:
    _checks(data)
    import cv2

    return _squash(cv2.cvtColor(_opencv_reduced(data), cv2.COLOR_BGR2RGB))


def opencv_reduced_area(data: bytes) -> np.ndarray:
    _checks(data)
    import cv2

    small = cv2.resize(_opencv_reduced(data), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


def photo_sets() -> dict[str, list[bytes]]:
    def plain(data: bytes) -> bool:
        im = Image.open(io.BytesIO(data))
        return im.format == "JPEG" and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1

    photos = [d for d in (p.read_bytes() for p in sorted((SHARED / "photos").rglob("*.jpg"))) if plain(d)]
    big = []
    for data in photos:  # real-photo-sized re-encodes, as bench/gpu makes its 50,000
        im = Image.open(io.BytesIO(data)).convert("RGB")
        out = io.BytesIO()
        im.resize((1600, 1600 * im.height // im.width), Image.Resampling.BICUBIC).save(
            out, "JPEG", quality=90
        )
        big.append(out.getvalue())
    flowers = [p.read_bytes() for p in sorted((SHARED / "flowers").rglob("*.jpg"))[:300]]
    return {
        f"photos 512-1280 px ({len(photos)})": photos,
        f"1600 px re-encodes ({len(big)})": big,
        f"flowers 128 px ({len(flowers)})": flowers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    paths: list[Callable[[bytes], np.ndarray]] = [pillow_draft]
    for module, fns in (
        ("simplejpeg", [simplejpeg_pillow_scales, simplejpeg_m8_scales]),
        ("cv2", [opencv_reduced, opencv_reduced_area]),
    ):
        try:
            __import__(module)
            paths.extend(fns)
        except ImportError:
            print(f"({module} not installed: its paths are left out)")
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    print(f"{'photos':<26} {'path':<26} {'img/s':>8} {'vs Pillow':>10} {'max |px diff|':>14} {'mean':>7}")
    for name, data in photo_sets().items():
        reference = [pillow_draft(d) for d in data]
        rates: dict[str, list[float]] = {fn.__name__: [] for fn in paths}
        outputs: dict[str, list[np.ndarray]] = {}
        for _ in range(args.runs):
            for fn in paths:
                started = time.perf_counter()
                outputs[fn.__name__] = [fn(d) for d in data]
                rates[fn.__name__].append(len(data) / (time.perf_counter() - started))
        base = statistics.median(rates["pillow_draft"])
        for fn in paths:
            diffs = [np.abs(o.astype(int) - r.astype(int)) for o, r in zip(outputs[fn.__name__], reference)]
            rate = statistics.median(rates[fn.__name__])
            print(
                f"{name:<26} {fn.__name__:<26} {rate:>8.1f} {rate / base:>9.2f}x "
                f"{max(int(d.max()) for d in diffs):>14} {np.mean([d.mean() for d in diffs]):>7.3f}"
            )


if __name__ == "__main__":
    main()
