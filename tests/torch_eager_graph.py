"""``eager_graph.call`` on PyTorch against Keras' own call: the child side of test_models' test.

Run as ``KERAS_BACKEND=torch python -m tests.torch_eager_graph`` (Keras fixes its backend at
import). Checks, printing one line each and exiting non-zero on a failure:

- the same outputs, exactly, for a graph with a branch read twice, a nested functional model,
  a nested Sequential and a layer of two inputs, and for characteristic 1 with ``gem+mirror``
  (the network nested in the mirror wrapper);
- the peak memory of a chain of 60 convolutions over 8 images of 128 px (8 MiB per layer's
  output): Keras' call keeps all of them until it returns, ``eager_graph.call`` about two.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; bench/backends.py reads it too."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(field)


def reset_peak() -> None:
    """Start VmHWM (this process's peak resident memory) again from its current size.

    ``ru_maxrss`` cannot be reset, and would carry the parent's peak across the exec of a child."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_growth_mib(run: Callable[[], object]) -> float:
    """How far this process's resident memory rose above where it stood while ``run()`` ran."""
    reset_peak()
    before = status_mib("VmRSS")
    run()
    return status_mib("VmHWM") - before


def main() -> int:
    import keras
    import torch

    from pupyl_queue import eager_graph
    from pupyl_queue.models import build_characteristic

    assert keras.backend.backend() == "torch", keras.backend.backend()
    torch.set_grad_enabled(False)
    failures = 0

    inner = keras.Sequential([keras.layers.Conv2D(8, 3, padding="same"), keras.layers.ReLU()])
    nested_in = keras.Input((32, 32, 8))
    nested = keras.Model(nested_in, keras.layers.Conv2D(8, 1)(nested_in))
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    branch = inner(x)
    x = keras.layers.Add()([x, branch, nested(x)])  # x read three times, by one layer
    x = keras.layers.Multiply()([x, x])
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs)
    pixels = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    ours = keras.ops.convert_to_numpy(eager_graph.call(model, keras.ops.convert_to_tensor(pixels)))
    theirs = keras.ops.convert_to_numpy(model(pixels, training=False))
    difference = float(np.abs(ours - theirs).max())
    print(f"branches and nested models: max difference {difference:.1e}, shape {ours.shape}")
    failures += difference != 0.0 or ours.shape != (4, 8)

    mirror = build_characteristic(1, None, input_size=96).with_descriptor("gem+mirror")
    images = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    x = keras.ops.convert_to_tensor(mirror.preprocess(images.astype(np.float32)).transpose(0, 3, 1, 2))
    ours = keras.ops.convert_to_numpy(eager_graph.call(mirror._model, x))
    theirs = keras.ops.convert_to_numpy(mirror._model(x, training=False))
    difference = float(np.abs(ours - theirs).max())
    print(f"characteristic 1, gem+mirror: max difference {difference:.1e}, shape {ours.shape}")
    failures += difference != 0.0 or ours.shape != (3, 1024)

    inputs = keras.Input((128, 128, 16))
    x = inputs
    for _ in range(60):
        x = keras.layers.Conv2D(16, 3, padding="same")(x)
    chain = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    small = np.random.default_rng(2).random((1, 128, 128, 16), dtype=np.float32)
    eager_graph.call(chain, keras.ops.convert_to_tensor(small))  # warm up both paths
    chain(small, training=False)
    batch = keras.ops.convert_to_tensor(np.random.default_rng(3).random((8, 128, 128, 16), dtype=np.float32))
    outputs: dict[str, object] = {}
    lean = peak_growth_mib(lambda: outputs.update(ours=eager_graph.call(chain, batch)))
    keras_peak = peak_growth_mib(lambda: outputs.update(theirs=chain(batch, training=False)))
    ours, theirs = (keras.ops.convert_to_numpy(outputs[k]) for k in ("ours", "theirs"))
    difference = float(np.abs(ours - theirs).max())
    print(f"60 convolutions: peak +{lean:.0f} MiB, Keras' +{keras_peak:.0f} MiB; difference {difference:.1e}")
    # 60 outputs of 8 MiB: Keras' call holds ~480 MiB; ours a few outputs at a time.
    failures += keras_peak < 300 or lean > 100 or difference != 0.0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
