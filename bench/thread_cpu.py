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

from tests.workers import thread_stat

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers"


def passes(images: int, count: int) -> None:
    import tempfile

    from bench.ingest import ModelOnly, write_weights
    from pupyl_queue.characteristics import Characteristic

    characteristic = Characteristic(1)
    keras_home = Path(tempfile.mkdtemp(prefix="pupyl-thread-cpu-"))
    os.environ["KERAS_HOME"] = str(keras_home)
    weights = write_weights(characteristic, keras_home)  # random weights: the cost is the same
    network = ModelOnly(characteristic, weights, sorted(FLOWERS.rglob("*.jpg"))[:images], 32, "int8")
    threads = network.extractor.compute_threads()
    for n in range(count):
        before = sum(thread_stat("self", t)[1] for t in threads)
        rate, _ = network.once()
        per_image_ms = (sum(thread_stat("self", t)[1] for t in threads) - before) * 1000 / len(network.pixels)
        print(f"pass {n + 1}: {rate:.1f} img/s; interpreter threads {per_image_ms:.2f} CPU ms/img")


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
