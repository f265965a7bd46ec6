"""How far mixed precision moves the vectors: float16 and bfloat16 against float32.

    KERAS_BACKEND=jax python bench/mixed_precision.py [--images 64]     # or torch

``PUPYL_MIXED_PRECISION=true`` runs a GPU embed worker's network in a 16-bit compute dtype, and a
collection does not record it: its vectors sit beside those of float32 workers and are searched
by float32 queries. So the 16-bit vectors must stay well within what separates an image from
the next one. Measured on CPU (JAX and PyTorch run both dtypes there, rounding each layer's
output to 16 bits as a GPU does), through pupyl-queue's own forward pass (``FeatureExtractor``),
with the one real trained network there is offline, the ImageNet MobileNet 0.25 of
../shared/data/models, on real photos (the flowers). Random-weight networks cannot answer this:
even with calibrated batch norms (tests/backend_parity.py) different photos' vectors lie within
~4e-3 of each other, so any rounding reorders them. Prints, per dtype, the cosine distance between
an image's float32 and 16-bit vectors (median and largest), the smallest distance between two
different images (float32), and how many 16-bit vectors find their own float32 vector first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
POLICIES = ("mixed_float16", "mixed_bfloat16")


def photos(count: int, size: int, folder: Path = SHARED / "flowers") -> np.ndarray:
    from pupyl_queue.images import decode

    every = sorted(folder.rglob("*.jpg"))
    files = every[:: max(1, len(every) // count)][:count]  # spread over the folder (the flowers' kinds)
    return np.stack([decode(f.read_bytes(), 10**9, target=size).pixels(size) for f in files])


def compare(name: str, reference: np.ndarray, other: np.ndarray, policy: str) -> None:
    own = 1.0 - (reference * other).sum(axis=1)
    between = 1.0 - reference @ reference.T
    apart = between[~np.eye(len(reference), dtype=bool)].min()
    finds = int(((other @ reference.T).argmax(axis=1) == np.arange(len(reference))).sum())
    print(
        f"| {name} | {policy.removeprefix('mixed_')} | {np.median(own):.1e} | {own.max():.1e} "
        f"| {apart:.1e} | {finds}/{len(reference)} |",
        flush=True,
    )


def real_mobilenet(pixels: np.ndarray, weights: Path) -> None:
    import keras

    if not weights.exists():
        print(f"| MobileNet 0.25, ImageNet weights | (no {weights.name} in ../shared/data/models) |")
        return

    def embed() -> np.ndarray:
        """Through pupyl-queue's own forward pass (compiled per backend, preprocessing inside)."""
        from pupyl_queue.models import FeatureExtractor, ModelSpec

        model = keras.applications.MobileNet(
            alpha=0.25, weights=str(weights), include_top=False, pooling="avg", input_shape=pixels.shape[1:]
        )
        extractor = FeatureExtractor(
            ModelSpec("keras", 256, 224), model, keras.applications.mobilenet.preprocess_input
        )
        return extractor.embed(pixels)

    keras.mixed_precision.set_global_policy("float32")
    reference = embed()
    for policy in POLICIES:
        keras.mixed_precision.set_global_policy(policy)
        compare("MobileNet 0.25, ImageNet weights, 224 px", reference, embed(), policy)
    keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--photos", default=str(SHARED / "flowers"), help="a folder of JPEGs")
    parser.add_argument(
        "--weights", default=str(SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5"), help="MobileNet 0.25"
    )
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", "/tmp/pupyl-bench-keras")
    import keras

    device = "cpu"
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0].device_kind
    elif keras.backend.backend() == "torch":
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    backend = f"{keras.backend.backend()} ({device})"
    print(f"Keras {keras.__version__} on {backend}, {args.images} photos of {args.photos}")
    print("| network | 16-bit dtype | own distance, median | largest | two images, nearest | finds itself |")
    print("|---|---|---|---|---|---|")
    real_mobilenet(photos(args.images, 224, Path(args.photos)), Path(args.weights))


if __name__ == "__main__":
    main()
