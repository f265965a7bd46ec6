"""Each characteristic's network built channels-first on PyTorch against the same network built
channels-last, same weights: the child side of test_characteristics' layout test.

Run as ``KERAS_BACKEND=torch python -m tests.torch_layouts`` (Keras fixes its backend at import).
The layout does not depend on the input size, so both builds take 128 px images (a fraction of
the cost at 224-480); ``build_characteristic`` itself is checked on PyTorch against TensorFlow
by the parity test. Prints one line per network and descriptor; exits non-zero on a difference.
"""

from __future__ import annotations

import sys

import numpy as np

SIZE = 128
# Same backend, same weights, only the layout differs: measured at most 2.8e-6 (session 14,
# batch norms calibrated on the pictures and their mirror images), against test_models'
# BACKEND_TOLERANCE of 1e-4 between backends.
LAYOUT_TOLERANCE = 2e-5


def main() -> int:
    import keras

    from pupyl_queue.characteristics import Characteristic
    from pupyl_queue.models import build_characteristic
    from tests.backend_parity import calibrate_batchnorm
    from tests.imagegen import pattern

    assert keras.backend.backend() == "torch", keras.backend.backend()
    pixels = np.stack([np.asarray(pattern(seed, size=(SIZE, SIZE))) for seed in range(3)])
    # EfficientNetV2L is EfficientNetV2M's blocks, more of them, and its two builds take ~25 s
    # here: bench/backend_parity.py measures it on PyTorch as built (channels-first).
    for c in [c for c in Characteristic if c.network.channels_first and c != Characteristic(9)]:
        net = c.network
        ours = build_characteristic(c, None, "channels_first", SIZE)
        calibrate_batchnorm(ours, pixels)
        reference = build_characteristic(c, None, "channels_last", SIZE)
        reference._model.set_weights(ours._model.get_weights())
        for descriptor in ("avg", "gem+mirror"):
            a = ours.with_descriptor(descriptor).embed(pixels)
            b = reference.with_descriptor(descriptor).embed(pixels)
            apart = np.abs(a[0] - a[1:]).max(axis=1).min()  # how much different images differ
            difference = np.abs(a - b).max()
            print(f"{net.application} {descriptor}: max difference {difference:.2e}, images {apart:.2e}")
            if difference > LAYOUT_TOLERANCE or apart < 1e-3:
                return 1
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
