"""What the two whole-frame copies of an upright RGB image cost in ``images.decode``.

    python bench/decode_copies.py [--photos DIR] [--rounds 7]

Until session 12, ``decode`` copied every image twice after decoding it:
``ImageOps.exif_transpose`` returns a copy even when there is nothing to turn, and
``convert("RGB")`` copies an image already in RGB. Both are gone: the turn is made in
place, and an RGB image is not converted. "before" is today's ``decode`` plus those
two copies (exactly what the old code did for such an image), so both run in one
process, interleaved round by round. Sets: photo-sized JPEGs (``bench/gpu/make_photos.py``
from ../shared/data/photos, or ``--photos``) and the 128 px flowers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from pupyl_queue.images import decode  # noqa: E402

LIMIT, SIZE = 64_000_000, 224


def before(data: bytes) -> None:
    image = decode(data, LIMIT, target=SIZE)
    image.rgb = image.rgb.copy().copy()  # exif_transpose's copy, then convert("RGB")'s
    image.pixels(SIZE)


def after(data: bytes) -> None:
    decode(data, LIMIT, target=SIZE).pixels(SIZE)


def rates(datas: list[bytes], rounds: int) -> dict[str, list[float]]:
    """CPU ms per image of each variant, one figure per round; the order alternates per round."""
    out: dict[str, list[float]] = {"before": [], "after": []}
    variants = [("before", before), ("after", after)]
    for r in range(rounds):
        for name, fn in variants if r % 2 else variants[::-1]:
            started = time.process_time()
            for data in datas:
                fn(data)
            out[name].append(1000 * (time.process_time() - started) / len(datas))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default="", help="a folder of photo-sized JPEGs (default: make 600)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.photos) if args.photos else Path(tmp, "photos")
        if not args.photos:
            sources = Path(tmp, "sources")
            sources.mkdir()
            for path in (SHARED / "photos").rglob("*.jpg"):
                (sources / path.name).write_bytes(path.read_bytes())
            subprocess.run(
                [sys.executable, str(ROOT / "bench/gpu/make_photos.py"), str(sources), str(folder), "600"],
                check=True,
            )
        sets = {
            "photo-sized JPEGs (400-1280 px)": sorted(folder.glob("*.jpg"))[:600],
            "flowers (128 px)": sorted((SHARED / "flowers").rglob("*.jpg"))[:1500],
        }
        print(f"CPU ms per image, decode + squash to {SIZE}, median of {args.rounds} rounds (one process)")
        print(f"{'set':34s} {'images':>6s} {'before':>8s} {'after':>8s} {'change':>8s}")
        for name, files in sets.items():
            datas = [f.read_bytes() for f in files]
            result = rates(datas, args.rounds)
            b, a = statistics.median(result["before"]), statistics.median(result["after"])
            print(f"{name:34s} {len(datas):6d} {b:8.3f} {a:8.3f} {100 * (a - b) / b:+7.1f}%")
            print(f"  rounds before {[round(x, 3) for x in result['before']]}")
            print(f"  rounds after  {[round(x, 3) for x in result['after']]}")


if __name__ == "__main__":
    main()
