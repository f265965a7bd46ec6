"""Retrieval quality of int8 vs float: leave-one-out P@1 / P@10 on ../shared/data/flowers.

The real ImageNet MobileNet 0.25 of ../shared/data/models, as a user's model, is
converted by pupyl-queue's own int8 path (calibrated on 100 flowers spread over
the set) and both are scored on the same 4,317 photos; also the cosine between
each photo's float and int8 vectors.

    .venv/bin/python bench/int8_quality.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def precision_at(vectors: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 10)) -> dict[int, float]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)  # leave one out
    top = np.argsort(-sims, axis=1)[:, : max(ks)]
    hits = labels[top] == labels[:, None]
    return {k: float(hits[:, :k].mean()) for k in ks}


def main() -> None:
    os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pupyl_queue.images import decode
    from pupyl_queue.int8 import CALIBRATION_IMAGES, Int8Extractor, convert
    from pupyl_queue.models import configure_backend, load_keras_model, wrap_mobilenet

    configure_backend(0, False)
    files, labels = [], []
    for label, folder in enumerate(sorted(p for p in (SHARED / "flowers").iterdir() if p.is_dir())):
        for f in sorted(folder.glob("*.jpg")):
            files.append(f)
            labels.append(label)
    y = np.array(labels)
    model = wrap_mobilenet(
        SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5", Path(tempfile.mkdtemp()) / "m.keras", alpha=0.25
    )
    float_x = load_keras_model(model)
    pixels = np.stack([decode(f.read_bytes(), 10**8, target=224).pixels(224) for f in files])
    calibration = pixels[:: len(pixels) // CALIBRATION_IMAGES][:CALIBRATION_IMAGES]
    started = time.perf_counter()
    int8_x = Int8Extractor(
        float_x.spec.with_precision("int8"), convert(float_x, calibration), float_x.preprocess
    )
    conversion = time.perf_counter() - started
    vf = np.concatenate([float_x.embed(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    vq = np.concatenate([int8_x.embed(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    pf, pq = precision_at(vf, y), precision_at(vq, y)
    cos = np.sum(vf * vq, axis=1)
    print(f"\n{len(files)} flowers, MobileNet 0.25 ImageNet weights, leave-one-out cosine retrieval")
    print(f"{'precision':<10} {'P@1':>6} {'P@10':>6}")
    print(f"{'float32':<10} {pf[1]:>6.3f} {pf[10]:>6.3f}")
    print(f"{'int8':<10} {pq[1]:>6.3f} {pq[10]:>6.3f}")
    print(
        f"P@10 change {pq[10] - pf[10]:+.3f}; cosine float vs int8: median {np.median(cos):.3f}, "
        f"5th percentile {np.percentile(cos, 5):.3f}; conversion {conversion:.1f}s"
    )


if __name__ == "__main__":
    main()
