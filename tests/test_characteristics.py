"""All nine characteristics build (random weights: nothing downloads) and behave as the table says."""

from __future__ import annotations

import numpy as np
import pytest

from pupyl_queue.characteristics import Characteristic
from pupyl_queue.models import ModelSpec, build_characteristic
from tests.imagegen import pattern


@pytest.mark.slow
@pytest.mark.parametrize("characteristic", list(Characteristic), ids=lambda c: c.network.application)
def test_each_characteristic(characteristic: Characteristic) -> None:
    import keras

    net = characteristic.network
    extractor = build_characteristic(characteristic, None)
    assert extractor.spec == ModelSpec.for_characteristic(characteristic)
    assert extractor._model.input_shape == (None, net.input_size, net.input_size, 3)
    assert extractor._model.output_shape == (None, net.feature_size)
    module = getattr(keras.applications, net.preprocess_module)
    assert extractor._preprocess is module.preprocess_input
    image = np.asarray(pattern(7, size=(net.input_size, net.input_size)))[None]
    first, second = extractor.embed(image), extractor.embed(image)
    assert first.shape == (1, net.feature_size)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)  # deterministic
    np.testing.assert_allclose(np.linalg.norm(first), 1.0, atol=1e-4)
    keras.backend.clear_session()


@pytest.mark.slow
def test_pytorch_builds_them_channels_first_with_the_same_vectors() -> None:
    """On PyTorch the characteristics that can are built channels-first (Keras would copy every
    conv's input to that layout and back): each gives the vectors of its channels-last build."""
    from tests.backend_parity import run_child

    stdout = run_child("torch", "tests.torch_layouts", timeout=600)
    checked = [line for line in stdout.splitlines() if "max difference" in line]
    assert len(checked) == 2 * (sum(c.network.channels_first for c in Characteristic) - 1) == 12
