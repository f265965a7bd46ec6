"""Peak memory of a PyTorch embed: ``eager_graph.call`` against Keras' own call, each in a fresh process.

    python bench/torch_memory.py [--characteristic 8] [--batch 8]

Each variant runs in its own process (nothing held over from the other): build the
characteristic as a PyTorch embed worker does (random weights), embed one uint8 batch twice,
and report the process's peak resident memory (VmHWM) after the build and after the embeds,
with the seconds of the second embed. The baseline is pupyl-queue's build run by Keras' own
call (``bench/backends.py``'s ``keras_own_call``), which keeps every layer's output until the
call returns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(characteristic: int, batch: int, variant: str) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from backends import keras_own_call

    from pupyl_queue.models import build_characteristic, configure_backend
    from tests.torch_eager_graph import status_mib

    configure_backend(0, False)
    extractor = build_characteristic(characteristic, None)
    built = status_mib("VmHWM")
    if variant == "keras":
        extractor = keras_own_call(extractor)
    size = extractor.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    extractor.embed(pixels)
    started = time.perf_counter()
    extractor.embed(pixels)
    seconds = time.perf_counter() - started
    print(json.dumps({"built": built, "peak": status_mib("VmHWM"), "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--characteristic", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.characteristic, args.batch, args.child)
        return
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    env.setdefault("KERAS_HOME", "/tmp/pupyl-bench-keras")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, PyTorch on CPU")
    print(f"characteristic {args.characteristic}, a batch of {args.batch}")
    print("| variant | peak MiB after the build | peak MiB after two embeds | seconds of the second |")
    print("|---|---|---|---|")
    names = {"lean": "eager_graph.call (pupyl-queue)", "keras": "Keras' own call (before)"}
    for variant, name in names.items():
        command = [sys.executable, __file__, "--child", variant]
        command += ["--characteristic", str(args.characteristic), "--batch", str(args.batch)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(f"| {name} | failed (exit {out.returncode}) | {out.stderr.strip().splitlines()[-1:]} | |")
            continue
        data = json.loads(lines[-1])
        print(f"| {name} | {data['built']:.0f} | {data['peak']:.0f} | {data['seconds']:.1f} |")


if __name__ == "__main__":
    main()
