"""How far the OpenCV squash of a thumbnail moves its vector from Pillow's (images.squash).

The real pretrained MobileNet v1 0.25 of ../shared/data/models (ImageNet weights, 256-d, average
pooled), on flowers (128 px, enlarged to 224): per image, the cosine distance between the vector
of Pillow's bilinear squash and that of OpenCV's, next to the distance from each image to its
nearest other flower (how far apart different images are). One process, CPU.

    PYTHONPATH=. .venv/bin/python bench/squash_vectors.py [--images 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from pupyl_queue.images import decode, squash  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    import keras

    weights = SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    model = keras.applications.MobileNet(
        input_shape=(224, 224, 3), alpha=0.25, include_top=False, pooling="avg", weights=str(weights)
    )
    files = sorted((SHARED / "flowers").glob("*/*.jpg"))[:: max(1, 4317 // args.images)][: args.images]
    rgbs = [decode(f.read_bytes(), 10**8, target=224).rgb for f in files]
    pillow = np.stack([np.asarray(im.resize((224, 224), Image.Resampling.BILINEAR)) for im in rgbs])
    fast = np.stack([squash(im, 224) for im in rgbs])

    def vectors(pixels: np.ndarray) -> np.ndarray:
        x = keras.applications.mobilenet.preprocess_input(pixels.astype("float32"))
        v = np.asarray(model.predict(x, batch_size=32, verbose=0))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    a, b = vectors(pillow), vectors(fast)
    moved = 1 - np.sum(a * b, axis=1)
    similarity = a @ a.T
    np.fill_diagonal(similarity, -1)
    nearest_other = 1 - similarity.max(axis=1)
    same_rank = np.mean(np.argmax(b @ a.T, axis=1) == np.arange(len(a)))
    print(f"{len(files)} flowers, MobileNet v1 0.25 (ImageNet), cosine distance")
    print(f"{'':<46} {'median':>10} {'extreme':>10}")
    rows = [
        ("Pillow squash vs OpenCV squash, same image", np.median(moved), moved.max(), "max"),
        ("an image vs its nearest other flower", np.median(nearest_other), nearest_other.min(), "min"),
    ]
    for what, median, extreme, which in rows:
        print(f"{what:<46} {median:>10.2e} {extreme:>10.2e} ({which})")
    print(f"OpenCV vector finds its own Pillow vector first: {same_rank:.1%}")


if __name__ == "__main__":
    main()
