"""The CPU a batch's pixel block costs, by itself: a fresh block per batch against a reused one.

One process plays both sides, as the embed worker and its decode processes do with a batch:
the decode side attaches the block once per group of 8 images and writes their pixels, the
feeding side reads every slot (as np.stack does before the network). "fresh" is the code before
session 11 (create, attach per group, close, unlink per batch: every page faulted and zeroed
again); "reused" is decode_pool.PixelSlots now (a free list of blocks; decode processes keep
their mapping, decode_pool._attached). CPU is this process's (user + system), median of --runs.

    PYTHONPATH=. .venv/bin/python bench/pixel_blocks.py [--batch 64] [--batches 20] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pupyl_queue import decode_pool  # noqa: E402

SIZE, GROUP = 224, 8


def fresh(batch: int, image: np.ndarray) -> int:
    shm = shared_memory.SharedMemory(create=True, size=batch * SIZE * SIZE * 3)
    for first in range(0, batch, GROUP):  # the decode processes: one attach per group
        mapped = shared_memory.SharedMemory(name=shm.name)
        view = np.ndarray((batch, SIZE, SIZE, 3), np.uint8, buffer=mapped.buf)
        view[first : first + GROUP] = image
        del view
        mapped.close()
    pixels = np.ndarray((batch, SIZE, SIZE, 3), np.uint8, buffer=shm.buf)
    total = int(pixels[:, ::8, ::8].sum()) + len(np.stack(list(pixels)))  # the feeding side reads it all
    del pixels
    shm.close()
    shm.unlink()
    return total


def reused(batch: int, image: np.ndarray) -> int:
    slots = decode_pool.PixelSlots(batch, SIZE)
    for first in range(0, batch, GROUP):
        view = np.ndarray((batch, SIZE, SIZE, 3), np.uint8, buffer=decode_pool._attached(slots.block).buf)
        view[first : first + GROUP] = image
        del view
    assert slots.array is not None
    total = int(slots.array[:, ::8, ::8].sum()) + len(np.stack(list(slots.array)))
    slots.close()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    results: dict[str, list[float]] = {"fresh": [], "reused": []}
    for _ in range(args.runs):  # interleaved: the machine's noise hits both alike
        for name, way in (("fresh", fresh), ("reused", reused)):
            started = time.process_time()
            for _ in range(args.batches):
                way(args.batch, image)
            results[name].append((time.process_time() - started) * 1000 / args.batches)
    print(
        f"batch of {args.batch} images of {SIZE}x{SIZE}, median of {args.runs} runs of {args.batches} batches"
    )
    print(f"{'pixel block':<12} {'CPU ms/batch':>13} {'CPU ms/image':>13}")
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"{name:<12} {ms:>13.2f} {ms / args.batch:>13.3f}")


if __name__ == "__main__":
    main()
