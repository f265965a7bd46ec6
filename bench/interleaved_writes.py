"""Does a decode process pay more for a stored copy's write when it comes between two decodes?

One process, the benchmark photos (bench/ingest.py's set), a local store under /tmp: decode,
squash and write each photo's stored copy, three ways, CPU seconds (user + system) per photo:

- interleaved: decode one, write it, decode the next (what a decode process does,
  decode_pool._decode_group);
- apart: decode them all, then write them all;
- in groups of 8 (and 32): decode a group, then write its copies.

Session 10 asked it whether a decode process should hold its group's writes until the group is
decoded; the answer (bench/interleaved_writes.txt): no difference beyond this machine's noise.

    PYTHONPATH=. .venv/bin/python bench/interleaved_writes.py [--images 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from ingest import photo_set

    from pupyl_queue.images import decode
    from pupyl_queue.store import LocalStore

    work = Path(tempfile.mkdtemp(prefix="interleaved-"))
    datas = [p.read_bytes() for p in photo_set(args.images, work / "photos")]
    n = len(datas)

    def decoded(data: bytes) -> bytes:
        image = decode(data, 10**8, target=224)
        image.pixels(224)
        return image.normalized_bytes()

    print(f"{n} photos, CPU ms per photo (decode + squash + the stored copy's write)")
    print(f"{'run':>3} {'interleaved':>12} {'apart':>8} {'groups of 8':>12} {'groups of 32':>13}")
    for run in range(args.runs):
        store = LocalStore(tempfile.mkdtemp(dir=work))
        started = cpu()
        for i, data in enumerate(datas):
            store.put(f"c/images/i{i}.jpg", decoded(data))
        interleaved = cpu() - started
        started = cpu()
        copies = [decoded(data) for data in datas]
        for i, copy in enumerate(copies):
            store.put(f"c/images/a{i}.jpg", copy)
        apart = cpu() - started
        grouped = []
        for size in (8, 32):
            started = cpu()
            for first in range(0, n, size):
                group = [(i, decoded(datas[i])) for i in range(first, min(first + size, n))]
                for i, copy in group:
                    store.put(f"c/images/g{size}-{i}.jpg", copy)
            grouped.append(cpu() - started)
        row = [interleaved, apart, *grouped]
        print(f"{run:>3} " + " ".join(f"{1000 * v / n:>{w}.3f}" for v, w in zip(row, (12, 8, 12, 13))))


if __name__ == "__main__":
    main()
