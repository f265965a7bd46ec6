"""Per-thread CPU time of the int8 network, alone and inside a running embed worker.

Two figures of BENCHMARKS.md (session 15) come from here:

    # the int8 interpreters alone: consecutive passes over 1,000 flowers in this process
    PYTHONPATH=. python bench/thread_cpu.py passes --images 1000 --passes 3
    # an embed worker's threads, sampled until the process ends (start bench/ingest.py first)
    PYTHONPATH=. python bench/thread_cpu.py sample $(pgrep -f "celery.*-Q embed" | head -1)

A thread's CPU time (utime + stime in /proc/<pid>/task/<tid>/stat) says what the network itself
cost, whatever else ran on the cores; its elapsed time does not.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers"


def thread_stat(pid: int | str, tid: int | str) -> tuple[str, float, int]:
    """A thread's name, CPU seconds and nice value."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return stat[stat.index("(") + 1 : stat.rindex(")")], cpu, int(fields[16])


def passes(images: int, count: int) -> None:
    import numpy as np

    from pupyl_queue.characteristics import Characteristic
    from pupyl_queue.images import decode
    from pupyl_queue.int8 import CALIBRATION_IMAGES, Int8Extractor, convert
    from pupyl_queue.models import build_characteristic, configure_backend

    configure_backend(0, False)
    network = build_characteristic(Characteristic(1), None)  # random weights: the cost is the same
    files = sorted(FLOWERS.rglob("*.jpg"))[:images]
    pixels = np.stack([decode(f.read_bytes(), 10**9, target=224).pixels(224) for f in files])
    tflite = convert(network, pixels[:CALIBRATION_IMAGES])
    extractor = Int8Extractor(network.spec.with_precision("int8"), tflite, network.preprocess)
    extractor.embed(pixels[:32])
    for n in range(count):
        before = {t: thread_stat("self", t)[1] for t in extractor.compute_threads()}
        started = time.perf_counter()
        for first in range(0, len(pixels), 32):
            extractor.embed(pixels[first : first + 32])
        elapsed = time.perf_counter() - started
        spent = sum(thread_stat("self", t)[1] - before[t] for t in extractor.compute_threads())
        print(
            f"pass {n + 1}: {len(pixels) / elapsed:.1f} img/s; "
            f"interpreter threads {spent * 1000 / len(pixels):.2f} CPU ms/img",
            flush=True,
        )


def sample(pid: int) -> None:
    seen: dict[str, tuple[str, float, int]] = {}
    while Path(f"/proc/{pid}").exists():
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    seen[tid] = thread_stat(pid, tid)
                except OSError:  # exited meanwhile
                    continue
        except OSError:
            break
        time.sleep(0.5)
    print(f"pid {pid}: {len(seen)} threads, {sum(v[1] for v in seen.values()):.1f} CPU s")
    for tid, (name, cpu, nice) in sorted(seen.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {tid} {name:16s} nice {nice:3d} {cpu:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("passes")
    one.add_argument("--images", type=int, default=1000)
    one.add_argument("--passes", type=int, default=3)
    two = sub.add_parser("sample")
    two.add_argument("pid", type=int)
    args = parser.parse_args()
    if args.command == "passes":
        passes(args.images, args.passes)
    else:
        sample(args.pid)


if __name__ == "__main__":
    main()
