"""Embed saved pixels with the Keras backend of this process: the child side of the parity test.

Run as ``KERAS_BACKEND=jax python -m tests.backend_parity OUT.npz PIXELS.npy MODEL.keras WEIGHTS.h5``
(Keras picks its backend when first imported, so another backend needs another process).
It writes the vectors of a user's own model and of characteristic 1 (each with the default and
the ``gem+mirror`` descriptor), the backend that made them, characteristic 1's int8 cache key,
and what an int8 conversion said there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any

import numpy as np


def run_child(backend: str, module: str, *args: object, timeout: float) -> str:
    """Run ``python -m module args`` on another Keras backend (CPU only) and return its output.

    Keras picks its backend when first imported, so each backend needs its own process; the
    child fails the calling test with its output's tail."""
    from tests.conftest import ROOT

    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": str(ROOT),
        # One compute thread: the suite's two processes share two cores, and a pool per core
        # spin-waits against the other process (the PyTorch layout check took 159 s with two
        # threads beside two busy cores, 55 s with one; vectors do not depend on it).
        "OMP_NUM_THREADS": "1",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    }
    command = [sys.executable, "-m", module, *map(str, args)]
    child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(child.stdout)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    return child.stdout


def calibrate_batchnorm(extractor: Any, pixels: np.ndarray, mirrors: bool = True) -> None:
    """Give a random-weight network batch-norm statistics of real inputs, in place.

    Freshly initialized, every batch norm of a deep network passes activations through
    unscaled, and they shrink layer by layer: the vectors of different images then agree to
    within float error (with the gem descriptor, exactly), and a parity check would prove
    nothing. One training-mode pass with momentum 0 sets each moving mean and variance to what
    its layer sees, so activations keep their scale and different images differ.

    The statistics come from the pictures and their mirror images, as the ``+mirror``
    descriptors embed both: calibrated on 4 pictures alone, EfficientNetV2M's activations for
    their mirror images grew to 5e3 at the last block (12 for the pictures), and float
    round-off grew with them into vectors that differed by 1e-1 between backends
    (``mirrors=False``, the old way, is kept for bench/backend_layers.py to show it).
    """
    import keras

    from pupyl_queue.models import channels_first

    layers = [
        layer
        for layer in extractor._model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    # Training mode also drops paths (EfficientNetV2's stochastic depth): statistics taken so
    # would not match inference, where nothing is dropped.
    dropouts = [
        layer for layer in extractor._model._flatten_layers() if isinstance(layer, keras.layers.Dropout)
    ]
    rates = [layer.rate for layer in dropouts]
    for layer in dropouts:
        layer.rate = 0.0
    if mirrors:
        pixels = np.concatenate([pixels, pixels[:, :, ::-1]])
    x = extractor.preprocess(pixels.astype(np.float32))
    if channels_first(extractor._model):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    with _no_autograd():  # PyTorch would keep every activation for a backward pass (OOM at 480 px)
        extractor._model(x, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    for layer, rate in zip(dropouts, rates, strict=True):
        layer.rate = rate


def _no_autograd() -> Any:
    import keras

    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def embed_all(pixels: np.ndarray, model_file: str, weights: str, threads: int = 0) -> dict[str, np.ndarray]:
    from pupyl_queue.int8 import convert, source_hash
    from pupyl_queue.models import ModelError, build_characteristic, configure_backend, load_keras_model

    backend = configure_backend(threads, False)["backend"]
    own = load_keras_model(model_file)
    try:  # int8 conversion is TensorFlow's: elsewhere it must say so, not fail deep inside
        convert(own, pixels[:1])
        int8 = "converted"
    except ModelError as exc:
        int8 = str(exc)
    characteristic = build_characteristic(1, weights)
    return {
        "weights_live": np.array(_reads_weights_live(own, pixels[:1])),
        "backend": np.array(backend),
        "own": own.embed(pixels),
        "own_gem_mirror": own.with_descriptor("gem+mirror").embed(pixels),
        "characteristic": characteristic.embed(pixels),
        "characteristic_gem_mirror": characteristic.with_descriptor("gem+mirror").embed(pixels),
        # the key of the collection's cached int8 model: every backend must find the same one
        "characteristic_hash": np.array(source_hash(characteristic)),
        "int8": np.array(int8),
    }


def _reads_weights_live(extractor: Any, pixels: np.ndarray) -> bool:
    """Whether a built extractor embeds with its model's weights as they are now (set_weights after
    the build), as every backend must; the weights are put back before it returns."""
    model = extractor._model
    saved = model.get_weights()
    before = extractor.embed(pixels)
    try:
        model.set_weights([np.zeros_like(w) for w in saved])
        after = extractor.embed(pixels)
    finally:
        model.set_weights(saved)
    return not np.allclose(before, after) and np.allclose(extractor.embed(pixels), before)


if __name__ == "__main__":
    out, pixels, model_file, weights = sys.argv[1:5]
    np.savez(out, **embed_all(np.load(pixels), model_file, weights, threads=1))  # run_child's one thread
