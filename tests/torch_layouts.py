"""Each characteristic built as pupyl-queue builds it on PyTorch against the same network built
channels-last, same weights: the child side of test_characteristics' layout test.

Run as ``KERAS_BACKEND=torch python -m tests.torch_layouts`` (Keras fixes its backend at import).
Prints one line per characteristic and descriptor; exits non-zero on the first difference.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    import keras

    from pupyl_queue.characteristics import Characteristic
    from pupyl_queue.models import FeatureExtractor, build_characteristic, channels_first
    from tests.backend_parity import calibrate_batchnorm
    from tests.imagegen import pattern

    assert keras.backend.backend() == "torch", keras.backend.backend()
    # Only these are built differently on PyTorch (the others, built as on TensorFlow, would cost
    # minutes here to build and prove nothing new).
    for c in [c for c in Characteristic if c.network.channels_first]:
        net = c.network
        ours = build_characteristic(c, None)
        if not channels_first(ours._model):
            print(f"{net.application}: built with input {ours._model.input_shape}")
            return 1
        app = getattr(keras.applications, net.application)
        shape = (net.input_size, net.input_size, 3)
        pixels = np.stack([np.asarray(pattern(seed, size=shape[:2])) for seed in range(3)])
        calibrate_batchnorm(ours, pixels)
        plain = app(include_top=False, pooling="avg", input_shape=shape, weights=None)
        plain.set_weights(ours._model.get_weights())
        reference = FeatureExtractor(ours.spec, plain, ours._preprocess)
        for descriptor in ("avg", "gem+mirror"):
            a = ours.with_descriptor(descriptor).embed(pixels)
            b = reference.with_descriptor(descriptor).embed(pixels)
            apart = np.abs(a[0] - a[1:]).max(axis=1).min()  # how much different images differ
            difference = np.abs(a - b).max()
            print(f"{net.application} {descriptor}: max difference {difference:.2e}, images {apart:.2e}")
            if difference > 1e-5 or apart < 1e-3:
                return 1
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
