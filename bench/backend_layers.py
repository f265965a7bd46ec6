"""Where do TensorFlow and another Keras backend part on one network? Layer by layer.

    python bench/backend_layers.py [--characteristic 8] [--size 128] [--backend jax]
                                   [--calibrate pictures|pictures+mirrors]

Session 13's bench/backend_parity.py found EfficientNetV2's vectors 1e-5 to 1.5e-1 apart between
backends on random weights. This tells round-off from a layer that computes something else:
TensorFlow builds the network (random weights; batch norms calibrated, as
tests/backend_parity.py does, on the pictures alone or on the pictures and their mirror images)
and records every layer's output for the pictures and their mirror images; the other backend
loads those weights and does the same. Printed per layer (every 40th, and any where the
difference grows ten-fold), for the pictures and for their mirror images: max |other -
TensorFlow| / max |TensorFlow|, and that largest activation. A difference that grows
smoothly with depth is float round-off carried forward; one that jumps at a layer is that
layer disagreeing.
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


def child(work: Path, characteristic: int, size: int, calibrate: str) -> None:
    sys.path.insert(0, str(ROOT))
    import keras

    from pupyl_queue.models import build_characteristic
    from tests.backend_parity import calibrate_batchnorm
    from tests.imagegen import pattern

    pictures = np.stack([np.asarray(pattern(seed, size=(size, size))) for seed in range(4)])
    pixels = np.concatenate([pictures, pictures[:, :, ::-1]])  # what a +mirror descriptor embeds
    extractor = build_characteristic(characteristic, None, "channels_last", size)
    model = extractor._model
    x = extractor.preprocess(pixels.astype(np.float32))
    if keras.backend.backend() == "tensorflow":
        calibrate_batchnorm(extractor, pictures, mirrors=calibrate == "pictures+mirrors")
        np.savez(work / "weights.npz", *model.get_weights())
    else:
        saved = np.load(work / "weights.npz")
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
    layers = [m for m in model.layers if not isinstance(m, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [m.output for m in layers])
    outputs = probe.predict(x, batch_size=len(x), verbose=0)
    np.savez(work / f"{keras.backend.backend()}.npz", *outputs)
    (work / "names.txt").write_text("\n".join(f"{m.name} {type(m).__name__}" for m in layers))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--characteristic", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backend", default="jax", choices=("jax", "torch"))
    parser.add_argument("--calibrate", default="pictures", choices=("pictures", "pictures+mirrors"))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.characteristic, args.size, args.calibrate)
        return
    work = Path(tempfile.mkdtemp(prefix="backend-layers-"))
    for backend in ("tensorflow", args.backend):
        env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        env.setdefault("KERAS_HOME", "/tmp/pupyl-bench-keras")
        command = [sys.executable, __file__, "--child", str(work), "--size", str(args.size)]
        command += ["--characteristic", str(args.characteristic), "--calibrate", args.calibrate]
        subprocess.run(command, env=env, check=True)
    reference, other = np.load(work / "tensorflow.npz"), np.load(work / f"{args.backend}.npz")
    names = (work / "names.txt").read_text().splitlines()
    print(
        f"characteristic {args.characteristic}, {args.size} px, 4 pictures and their mirror images; "
        f"batch norms calibrated on the {args.calibrate}; {args.backend} against TensorFlow"
    )
    print("| layer | name, kind | pictures: difference (largest activation) | mirror images: the same |")
    print("|---|---|---|---|")
    grown = 0.0
    for i, name in enumerate(names):
        a, b = reference[f"arr_{i}"], other[f"arr_{i}"]
        cells, differences = [], []
        for half in (slice(0, 4), slice(4, 8)):
            scale = float(np.abs(a[half]).max()) or 1.0
            differences.append(float(np.abs(b[half] - a[half]).max()) / scale)
            cells.append(f"{differences[-1]:.1e} ({scale:.1e})")
        difference = max(differences)
        if difference > 10 * max(grown, 1e-7) or i % 40 == 0 or i == len(names) - 1:
            print(f"| {i} | {name} | {cells[0]} | {cells[1]} |")
        grown = max(grown, difference)


if __name__ == "__main__":
    main()
