"""Model-only rate of a characteristic on each Keras backend, on this machine's CPU.

    python bench/backends.py [--characteristics 1,2] [--batch 64] [--batches 3] [--rounds 3] [--gpu]

One child process per backend (Keras fixes its backend at import), one after another, each
running ``FeatureExtractor.embed`` exactly as an embed worker does: uint8 batches in, the
cast, preprocessing and network compiled per backend. On PyTorch three variants run side by
side: pupyl-queue's (channels-first where ``Network.channels_first``, run by
``eager_graph.call``); the network as Keras Applications builds it by default (channels-last),
the baseline the layout replaced (Keras 3.15 copies each conv's input to channels-first and
back in a channels-last network on PyTorch); and pupyl-queue's build run by Keras' own call,
the baseline ``eager_graph`` replaced (it keeps every layer's output to the end). Random
weights with batch norms calibrated (tests/backend_parity.py), random pixels. Each child
interleaves its variants round by round and prints img/s, CPU ms per image (every thread of
the process) and the peak growth of resident memory (VmHWM: host memory, not a GPU's) per
round; the table gives the median round and the largest peak. ``--gpu`` leaves the
GPUs visible (bench/gpu/ingest_run.sh runs it so, on JAX and PyTorch, where TensorFlow is absent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def keras_own_call(ours: Any) -> Any:
    """The same network and weights, run by Keras' own call as before session 14: eager PyTorch
    then holds every layer's output until the call returns (pupyl_queue/eager_graph.py)."""
    import keras
    import torch

    from pupyl_queue.models import FeatureExtractor, channels_first

    def features(x: Any) -> Any:
        x = ours._preprocess(keras.ops.cast(x, "float32"))
        return keras.ops.transpose(x, (0, 3, 1, 2)) if channels_first(ours._model) else x

    def forward(batch: Any) -> Any:
        with torch.no_grad():
            out = ours._model(features(keras.ops.convert_to_tensor(batch)), training=False)
            return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))

    kept = FeatureExtractor(ours.spec, ours._model, ours._preprocess)
    kept._forward = forward
    return kept


def child(characteristic: int, batch: int, batches: int, rounds: int) -> None:
    """Runs in the backend's own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    from pupyl_queue.models import build_characteristic, configure_backend
    from tests.backend_parity import calibrate_batchnorm
    from tests.torch_eager_graph import reset_peak, status_mib

    configure_backend(0, False)
    backend = keras.backend.backend()
    ours = build_characteristic(characteristic, None)
    size = ours.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    calibrate_batchnorm(ours, pixels[:8])
    variants = {f"{backend}": ours}
    if backend == "torch":
        plain = build_characteristic(characteristic, None, "channels_last")
        plain._model.set_weights(ours._model.get_weights())
        variants = {
            "torch, pupyl-queue's build": ours,
            "torch, channels-last (Keras' default build)": plain,
            "torch, pupyl-queue's build, Keras' own call": keras_own_call(ours),
        }
    for extractor in variants.values():
        extractor.embed(pixels)  # compile / warm up
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants.items())
        for name, extractor in order if r % 2 == 0 else order[::-1]:
            reset_peak()
            rss = status_mib("VmRSS")
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                extractor.embed(pixels)
            n = batch * batches
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results[name].append((n / wall, 1000 * cpu / n, status_mib("VmHWM") - rss))
    vectors = {name: extractor.embed(pixels[:4]) for name, extractor in variants.items()}
    first = next(iter(vectors.values()))
    agree = max(float(np.abs(v - first).max()) for v in vectors.values())
    print(json.dumps({"characteristic": characteristic, "results": results, "max_difference": agree}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--characteristics", default="1,2")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (default: hide it, CPU only)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.batches, args.rounds)
        return
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; batch {args.batch}, "
        f"{args.batches} batches per round, {args.rounds} rounds"
    )
    print("| characteristic | backend | img/s (median round) | CPU ms/img | peak MiB | rounds img/s |")
    print("|---|---|---|---|---|---|")
    for characteristic in [int(c) for c in args.characteristics.split(",")]:
        for backend in args.backends.split(","):
            env = {**os.environ, "KERAS_BACKEND": backend}
            if not args.gpu:
                env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
            env.setdefault("KERAS_HOME", "/tmp/pupyl-bench-keras")
            command = [
                sys.executable,
                __file__,
                "--child",
                str(characteristic),
                "--batch",
                str(args.batch),
                "--batches",
                str(args.batches),
                "--rounds",
                str(args.rounds),
            ]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(
                    f"| {characteristic} | {backend} | failed (exit {out.returncode}): "
                    f"{out.stderr.strip().splitlines()[-1:]} | | | |"
                )
                continue
            data = json.loads(lines[-1])
            for name, rounds in data["results"].items():
                rates = [rate for rate, *_ in rounds]
                cpu = statistics.median(c for _, c, *_ in rounds)
                peak = max(p for *_, p in rounds)
                print(
                    f"| {characteristic} | {name} | {statistics.median(rates):.1f} | {cpu:.1f} | "
                    f"{peak:.0f} | {', '.join(f'{r:.1f}' for r in rates)} |"
                )
            if backend == "torch":
                difference = data["max_difference"]
                print(f"| {characteristic} | (torch variants: max difference {difference:.1e}) | | | | |")


if __name__ == "__main__":
    main()
