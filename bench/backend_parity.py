"""Do the nine characteristics give the same vectors on TensorFlow, JAX and PyTorch? Each descriptor.

    python bench/backend_parity.py [--size 128] [--characteristics 1,2,...,9]

The parity tests check characteristic 1 and a user's model; this measures all nine, each with
the four descriptors. TensorFlow builds each network (random weights, batch norms calibrated on
the pictures and their mirror images: tests/backend_parity.py) and saves its weights; JAX and
PyTorch build the same network as pupyl-queue does on them (channels-first on PyTorch where
``Network.channels_first``), load those weights and embed the same pictures. The networks take
``--size`` px images (the input size does not change what is compared; 128 px keeps the run
short). Prints, per characteristic, descriptor and backend, the largest difference from
TensorFlow per component of the unit vectors, the cosine distance that makes between a
picture's two vectors, and how far apart different pictures are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTORS = ("avg", "avg+mirror", "gem", "gem+mirror")


def child(work: Path, size: int, characteristics: list[int]) -> None:
    sys.path.insert(0, str(ROOT))
    import keras

    from pupyl_queue.characteristics import Characteristic
    from pupyl_queue.models import build_characteristic
    from tests.backend_parity import calibrate_batchnorm
    from tests.imagegen import pattern

    backend = keras.backend.backend()
    pixels = np.stack([np.asarray(pattern(seed, size=(size, size))) for seed in range(4)])
    for value in characteristics:
        net = Characteristic(value).network
        extractor = build_characteristic(value, None, input_size=size)  # as this backend runs it
        model = extractor._model
        weights = work / f"{value}.npz"
        if backend == "tensorflow":
            calibrate_batchnorm(extractor, pixels)
            np.savez(weights, *model.get_weights())
        else:
            saved = np.load(weights)
            model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
        vectors = {d: extractor.with_descriptor(d).embed(pixels) for d in DESCRIPTORS}
        np.savez(work / f"{value}-{backend}.npz", **{d.replace("+", "_"): v for d, v in vectors.items()})
        print(f"{backend} {net.application} done", flush=True)
        keras.backend.clear_session()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--characteristics", default="1,2,3,4,5,6,7,8,9")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    characteristics = [int(c) for c in args.characteristics.split(",")]
    if args.child:
        child(Path(args.child), args.size, characteristics)
        return
    sys.path.insert(0, str(ROOT))
    from pupyl_queue.characteristics import Characteristic

    work = Path(tempfile.mkdtemp(prefix="backend-parity-"))
    for backend in ("tensorflow", "jax", "torch"):
        env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        env.setdefault("KERAS_HOME", "/tmp/pupyl-bench-keras")
        command = [sys.executable, __file__, "--child", str(work), "--size", str(args.size)]
        subprocess.run([*command, "--characteristics", args.characteristics], env=env, check=True)
    print(f"\n{args.size} px pictures, 4 of them; max |difference from TensorFlow| per component of the")
    print("unit vectors, and the largest cosine distance between a picture's vectors on two backends,")
    print("next to the smallest cosine distance between two different pictures (TensorFlow)")
    print("| characteristic | descriptor | JAX | PyTorch | cosine distance, JAX / PyTorch | pictures apart |")
    print("|---|---|---|---|---|---|")
    for value in characteristics:
        tf = np.load(work / f"{value}-tensorflow.npz")
        others = {b: np.load(work / f"{value}-{b}.npz") for b in ("jax", "torch")}
        for descriptor in DESCRIPTORS:
            key = descriptor.replace("+", "_")
            a = tf[key]
            between = 1.0 - a @ a.T
            apart = between[~np.eye(len(a), dtype=bool)].min()
            diffs = [np.abs(others[b][key] - a).max() for b in ("jax", "torch")]
            cosine = [(1.0 - (others[b][key] * a).sum(axis=1)).max() for b in ("jax", "torch")]
            name = Characteristic(value).network.application
            print(
                f"| {value} {name} | {descriptor} | {diffs[0]:.1e} | {diffs[1]:.1e} "
                f"| {cosine[0]:.1e} / {cosine[1]:.1e} | {apart:.1e} |"
            )


if __name__ == "__main__":
    main()
