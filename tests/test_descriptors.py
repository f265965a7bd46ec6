"""A collection's global descriptor (issue #18): recorded in its manifest, honoured by its extractor.

Through real workers: tests/test_copies.py (test_workers_embed_with_the_collection_descriptor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue.collection import ensure_collection, model_spec
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelError, ModelMismatchError, ModelSpec, extractor_for, normalize
from pupyl_queue.settings import Settings, SettingsError
from pupyl_queue.store import LocalStore


def batch(seed: int = 0, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 224, 224, 3), dtype=np.uint8)


def test_spec_records_its_descriptor_and_an_old_manifest_reads_as_before() -> None:
    plain = ModelSpec("keras", 256, 224, sha256="ab" * 32)
    assert plain.descriptor == "avg" and "descriptor" not in plain.to_json()  # manifests as before
    old = {"kind": "keras", "dim": 256, "input_size": 224, "characteristic": 0, "sha256": "ab" * 32}
    assert ModelSpec.from_json(old) == plain
    gem = plain.with_descriptor("gem+mirror")
    assert gem.to_json()["descriptor"] == "gem+mirror" and ModelSpec.from_json(gem.to_json()) == gem
    assert gem != plain and "gem+mirror descriptor" in gem.label
    with pytest.raises(ValueError, match="descriptor must be one of"):
        plain.with_descriptor("max")
    with pytest.raises(SettingsError, match="PUPYL_DESCRIPTOR must be one of avg, avg\\+mirror"):
        Settings(descriptor="gem-mirror")


def reference(tiny_model: Path, pixels: np.ndarray, pooling: str) -> np.ndarray:
    """The descriptor computed by hand from the network's last feature maps (numpy)."""
    import keras

    model = keras.models.load_model(tiny_model, compile=False)
    mobilenet = model.layers[-1]
    maps_model = keras.Model(mobilenet.input, mobilenet.layers[-2].output)
    maps = np.asarray(maps_model(pixels.astype(np.float32) / 127.5 - 1.0))
    if pooling == "gem":
        return normalize(np.cbrt(np.mean(np.maximum(maps, 1e-6) ** 3, axis=(1, 2))))
    return normalize(maps.mean(axis=(1, 2)))


def test_extractor_pools_as_its_spec_says(tiny_model: Path) -> None:
    base = extractor_for(ModelSpec.from_json(_spec_json(tiny_model)), "", tiny_model)
    x = batch()
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    np.testing.assert_allclose(base.embed(x), reference(tiny_model, x, "avg"), atol=1e-5)
    gem = extractor_for(base.spec.with_descriptor("gem"), "", tiny_model)
    assert gem is not base and gem.spec.descriptor == "gem"
    np.testing.assert_allclose(gem.embed(x), reference(tiny_model, x, "gem"), atol=1e-5)
    both = extractor_for(base.spec.with_descriptor("gem+mirror"), "", tiny_model)
    expected = normalize(reference(tiny_model, x, "gem") + reference(tiny_model, mirrored, "gem"))
    np.testing.assert_allclose(both.embed(x), expected, atol=1e-5)
    np.testing.assert_allclose(both.embed(mirrored), both.embed(x), atol=1e-5)  # mirror-invariant
    assert np.abs(base.embed(mirrored) - base.embed(x)).max() > 1e-3  # avg is not
    # Another pooling gives other vectors: a query embedded with the wrong one would rank wrongly.
    assert np.min(np.sum(gem.embed(x) * base.embed(x), axis=1)) < 0.999
    assert extractor_for(base.spec.with_descriptor("gem+mirror"), "", tiny_model) is both  # resident


def _spec_json(tiny_model: Path) -> dict:
    from pupyl_queue.models import sha256_file

    return {"kind": "keras", "dim": 256, "input_size": 224, "sha256": sha256_file(tiny_model)}


def test_gem_needs_a_global_average_pooling(tmp_path: Path) -> None:
    import keras

    from pupyl_queue.models import load_keras_model

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, pooled).save(tmp_path / "maxpool.keras")
    extractor = load_keras_model(tmp_path / "maxpool.keras")
    with pytest.raises(ModelError, match="has none .*use the avg descriptor"):
        extractor.with_descriptor("gem")
    mirrored = extractor.with_descriptor("avg+mirror")  # mirror-averaging needs no pooling layer
    x = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(mirrored.embed(x), mirrored.embed(x[:, :, ::-1].copy()), atol=1e-5)
    # A network pooled at its top level (as the nine characteristics are) is swapped there.
    conv = keras.layers.Conv2D(4, 3, activation="relu")
    flat = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    flat.save(tmp_path / "flat.keras")
    gem = load_keras_model(tmp_path / "flat.keras").with_descriptor("gem")
    maps = np.maximum(np.asarray(keras.Model(inputs, conv(inputs))(x.astype(np.float32))), 1e-6)
    expected = normalize(np.cbrt(np.mean(maps**3, axis=(1, 2))))
    np.testing.assert_allclose(gem.embed(x), expected, atol=1e-5)


def test_manifest_records_the_descriptor_and_a_request_cannot_change_it(
    redis_client: redis.Redis, tmp_path: Path, tiny_model: Path
) -> None:
    store, layout = LocalStore(tmp_path), Layout("gem")
    request = {"model": str(tiny_model), "default_descriptor": "gem+mirror"}
    spec = ensure_collection(store, redis_client, layout, request)
    assert spec.descriptor == "gem+mirror" and model_spec(store, layout) == spec
    manifest = json.loads(store.get(layout.manifest))
    assert manifest["model"]["descriptor"] == "gem+mirror"
    # Another default (a caller with other settings) adopts the collection's; naming another fails.
    assert ensure_collection(store, redis_client, layout, {"default_descriptor": "avg"}) == spec
    assert ensure_collection(store, redis_client, layout, {"model": str(tiny_model)}) == spec
    with pytest.raises(ModelMismatchError, match="gem\\+mirror descriptor.*asks for keras model"):
        ensure_collection(store, redis_client, layout, {"descriptor": "avg"})
    with pytest.raises(ValueError, match="descriptor must be one of"):
        ensure_collection(store, redis_client, Layout("bad"), {"descriptor": "max"})
    # A collection made before descriptors existed: its manifest names none, it reads as avg.
    plain = ensure_collection(store, redis_client, Layout("plain"), {"characteristic": 1})
    written = json.loads(store.get(Layout("plain").manifest))
    assert "descriptor" not in written["model"] and plain.descriptor == C.DEFAULT_DESCRIPTOR
    assert ensure_collection(store, redis_client, Layout("plain"), {"characteristic": 1}) == plain


def test_client_and_cli_name_a_descriptor_for_new_collections() -> None:
    from pupyl_queue import PupylQueue
    from pupyl_queue.cli import parser

    settings = Settings(redis_url="redis://127.0.0.1:1/0", descriptor="gem")
    client = PupylQueue(settings=settings, descriptor="gem+mirror")
    assert (client.descriptor, client.settings.descriptor) == ("gem+mirror", "gem")
    assert PupylQueue(settings=settings).descriptor is None  # the setting decides at creation
    with pytest.raises(ValueError, match="descriptor must be one of"):
        PupylQueue(settings=settings, descriptor="max")
    args = parser().parse_args(["--descriptor", "gem+mirror", "up"])
    assert args.descriptor == "gem+mirror"


def test_gem_leaves_the_poolings_inside_the_network_alone(tmp_path: Path) -> None:
    """Squeeze-and-excite blocks (EfficientNetV2) pool too, then gate the feature maps with the
    result: gem swaps only the pooling that makes the vector, so the network stays the same."""
    import keras

    from pupyl_queue.models import load_keras_model

    inputs = keras.Input((32, 32, 3))
    maps = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    squeezed = keras.layers.Reshape((1, 1, 8))(keras.layers.GlobalAveragePooling2D()(maps))
    gated = keras.layers.Multiply()([maps, keras.layers.Conv2D(8, 1, activation="sigmoid")(squeezed)])
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(gated)).save(tmp_path / "se.keras")
    plain = load_keras_model(tmp_path / "se.keras")
    gem = plain.with_descriptor("gem")
    kinds = [type(layer).__name__ for layer in gem._model._flatten_layers()]
    assert kinds.count("GlobalAveragePooling2D") == 1 and kinds.count("GeneralizedMeanPooling") == 1
    x = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    before_pooling = keras.Model(plain._model.inputs, plain._model.layers[-2].output)  # the gated maps
    gated_maps = np.maximum(np.asarray(before_pooling(x.astype(np.float32))), 1e-6)
    np.testing.assert_allclose(
        gem.embed(x), normalize(np.cbrt(np.mean(gated_maps**3, axis=(1, 2)))), atol=1e-5
    )
