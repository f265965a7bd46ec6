"""Embed saved pixels with the Keras backend of this process: the child side of the parity test.

Run as ``KERAS_BACKEND=jax python -m tests.backend_parity OUT.npz PIXELS.npy MODEL.keras WEIGHTS.h5``
(Keras picks its backend when first imported, so another backend needs another process).
It writes the vectors of a user's own model (with the default and the ``gem+mirror`` descriptor)
and of characteristic 1, the backend that made them, and what an int8 conversion said there.
"""

from __future__ import annotations

import sys

import numpy as np


def embed_all(pixels: np.ndarray, model_file: str, weights: str) -> dict[str, np.ndarray]:
    from pupyl_queue.int8 import convert
    from pupyl_queue.models import ModelError, build_characteristic, configure_backend, load_keras_model

    backend = configure_backend(0, False)["backend"]
    own = load_keras_model(model_file)
    try:  # int8 conversion is TensorFlow's: elsewhere it must say so, not fail deep inside
        convert(own, pixels[:1])
        int8 = "converted"
    except ModelError as exc:
        int8 = str(exc)
    return {
        "backend": np.array(backend),
        "own": own.embed(pixels),
        "own_gem_mirror": own.with_descriptor("gem+mirror").embed(pixels),
        "characteristic": build_characteristic(1, weights).embed(pixels),
        "int8": np.array(int8),
    }


if __name__ == "__main__":
    out, pixels, model_file, weights = sys.argv[1:5]
    np.savez(out, **embed_all(np.load(pixels), model_file, weights))
