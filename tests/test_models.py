"""Building networks and loading weights, all offline."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue.characteristics import Characteristic
from pupyl_queue.collection import ensure_collection, model_spec
from pupyl_queue.layout import Layout
from pupyl_queue.models import (
    ModelError,
    ModelMismatchError,
    ModelSpec,
    build_characteristic,
    extractor_for,
    load_keras_model,
    resolve_weights,
)
from pupyl_queue.store import LocalStore
from tests.imagegen import pattern

MOBILENET = Characteristic.MINIMUMWEIGHT_FAST_SMALL_PRECISION
BACKEND_TOLERANCE = 1e-4  # max |difference| per component of unit vectors, any two Keras backends


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random MobileNet weights (batch norms calibrated) saved under the file name Keras caches them as."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from tests.backend_parity import calibrate_batchnorm

    folder = tmp_path_factory.mktemp("weights")
    extractor = build_characteristic(MOBILENET, None)
    pictures = np.stack([np.asarray(pattern(seed, size=(224, 224))) for seed in range(8)])
    calibrate_batchnorm(extractor, pictures)
    with h5py.File(folder / MOBILENET.network.weights_file, "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, extractor._model)
    return folder


def test_characteristic_loads_from_weights_directory(weights_dir: Path) -> None:
    path = resolve_weights(MOBILENET, str(weights_dir))
    assert path == str(weights_dir / "mobilenet_1_0_224_tf_no_top.h5")
    a = build_characteristic(MOBILENET, path)
    b = build_characteristic(MOBILENET, path)
    assert a.spec == ModelSpec.for_characteristic(1) and a.spec.dim == 1024
    batch = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    va, vb = a.embed(batch), b.embed(batch)
    assert va.shape == (3, 1024)
    np.testing.assert_allclose(va, vb, atol=1e-5)  # same file, same features
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(va[0], va[1])


def test_extractor_is_built_once_per_process(weights_dir: Path) -> None:
    spec = ModelSpec.for_characteristic(1)
    assert extractor_for(spec, str(weights_dir), None) is extractor_for(spec, str(weights_dir), None)


def test_missing_weights_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="mobilenet_1_0_224_tf_no_top.h5.*https://storage.googleapis"):
        resolve_weights(MOBILENET, str(tmp_path))
    with pytest.raises(ModelError, match="neither a weights file nor a directory"):
        resolve_weights(MOBILENET, str(tmp_path / "nope.h5"))


def test_failed_imagenet_fetch_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A dead proxy makes the real fetch path fail fast, with or without internet.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urllib's shared opener reads the proxies once, when the process's first urlopen builds it: if
    # that is Keras's fetch here, every later urlopen of this test process (the tests' HTTP clients)
    # goes through the dead proxy, refused. The opener this fetch builds goes with the test.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(ModelError) as err:
        build_characteristic(MOBILENET, resolve_weights(MOBILENET, ""))
    message = str(err.value)
    assert MOBILENET.network.weights_url in message and "PUPYL_WEIGHTS" in message


def test_own_keras_model(tiny_model: Path) -> None:
    extractor = load_keras_model(tiny_model)
    assert (extractor.spec.kind, extractor.spec.dim, extractor.input_size) == ("keras", 256, 224)
    assert len(extractor.spec.sha256) == 64
    with pytest.raises(ValueError, match=r"expected \(n, 224, 224, 3\)"):
        extractor.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))


def test_bad_model_files(tmp_path: Path) -> None:
    import keras

    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="could not load the Keras model file"):
        load_keras_model(junk)
    inputs = keras.Input((32, 48, 3))
    odd = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    odd.save(tmp_path / "odd.keras")
    with pytest.raises(ModelError, match="square RGB image input"):
        load_keras_model(tmp_path / "odd.keras")


def test_collection_keeps_its_characteristic(redis_client: redis.Redis, tmp_path: Path) -> None:
    store, layout = LocalStore(tmp_path), Layout("photos")
    spec = ensure_collection(store, redis_client, layout, {"characteristic": 1})
    assert model_spec(store, layout) == spec
    assert ensure_collection(store, redis_client, layout, {"default_characteristic": 2}) == spec
    with pytest.raises(ModelMismatchError, match="created with MINIMUMWEIGHT.*asks for LIGHTWEIGHT"):
        ensure_collection(store, redis_client, layout, {"characteristic": "LIGHTWEIGHT_FAST_SMALL_PRECISION"})


def test_collection_with_own_model(redis_client: redis.Redis, tmp_path: Path, tiny_model: Path) -> None:
    store, layout = LocalStore(tmp_path), Layout()
    spec = ensure_collection(store, redis_client, layout, {"model": str(tiny_model)})
    assert spec.kind == "keras" and store.get(layout.model_file) == tiny_model.read_bytes()
    with pytest.raises(ModelMismatchError, match="keras model"):
        ensure_collection(store, redis_client, layout, {"characteristic": 1})


def test_pytorch_lets_each_activation_go_after_its_last_reader() -> None:
    """Eager PyTorch under Keras' own call held every layer's output to the end (EfficientNetV2M,
    8 images at 480 px: 10 GB); ``eager_graph.call`` gives the same outputs, holding a few."""
    from tests.backend_parity import run_child

    stdout = run_child("torch", "tests.torch_eager_graph", timeout=300)
    assert len([line for line in stdout.splitlines() if "difference" in line]) == 3


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_give_the_same_vectors(
    backend: str, tiny_model: Path, weights_dir: Path, tmp_path: Path
) -> None:
    """KERAS_BACKEND=jax or torch runs the same collections: same vectors within float tolerance.

    The parent embeds on TensorFlow; a child process (Keras fixes its backend at
    import) embeds the same uint8 photos with the same files on the other backend.
    Both backends are in the test extras, so neither test is skipped in CI.
    """
    from pupyl_queue.images import decode
    from tests.backend_parity import embed_all, run_child
    from tests.conftest import PHOTOS

    files = sorted((PHOTOS / "caer").glob("*.jpg"))[:4] if PHOTOS.exists() else []
    if files:
        pixels = np.stack([decode(f.read_bytes(), 10**8, target=224).pixels(224) for f in files])
    else:
        pixels = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    weights = str(weights_dir / MOBILENET.network.weights_file)
    ours = embed_all(pixels, str(tiny_model), weights)
    out = tmp_path / f"{backend}.npz"
    run_child(backend, "tests.backend_parity", out, tmp_path / "pixels.npy", tiny_model, weights, timeout=240)
    theirs = np.load(out)
    assert str(ours["backend"]) == "tensorflow" and str(theirs["backend"]) == backend
    assert str(ours["int8"]) == "converted"
    assert "int8 conversion needs the TensorFlow backend" in str(theirs["int8"])
    assert str(ours["characteristic_hash"]) == str(theirs["characteristic_hash"])
    assert bool(ours["weights_live"]) and bool(theirs["weights_live"]), "set_weights after the build unseen"
    for name in ("own", "own_gem_mirror", "characteristic", "characteristic_gem_mirror"):
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape == (len(pixels), 1024 if name.startswith("characteristic") else 256)
        # Different photos must differ far more than the tolerance, or agreeing would prove nothing.
        assert np.abs(a[0] - a[1:]).max(axis=1).min() > 100 * BACKEND_TOLERANCE, name
        cosine = np.sum(a * b, axis=1)
        print(f"{name}: max |tf - {backend}| {np.abs(a - b).max():.2e}, min cosine {cosine.min():.8f}")
        np.testing.assert_allclose(a, b, atol=BACKEND_TOLERANCE)
        assert cosine.min() > 1 - BACKEND_TOLERANCE


def test_null_extractor_costs_nothing_and_keeps_the_contract() -> None:
    """The benchmarks' null model: unit vectors at the spec's dimension, the same input checks."""
    spec = ModelSpec.null(dim=96, input_size=32)
    extractor = extractor_for(spec, "", None)
    assert extractor.spec == spec and "null extractor" in spec.label
    vectors = extractor.embed(np.zeros((5, 32, 32, 3), np.uint8))
    assert vectors.shape == (5, 96) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(n, 32, 32, 3\)"):
        extractor.embed(np.zeros((1, 224, 224, 3), np.uint8))


def test_non_finite_vectors_are_an_error_not_a_vector() -> None:
    """An overflow (float16 past its range, a broken model) must not reach the index as NaN."""
    from pupyl_queue.models import normalize

    vectors = np.ones((3, 4), dtype=np.float32)
    assert np.allclose(np.linalg.norm(normalize(vectors), axis=1), 1.0)
    vectors[1, 2] = np.inf
    with pytest.raises(ModelError, match=r"non-finite values \(inf or NaN\) for 1 of 3 images"):
        normalize(vectors)
    vectors[1, 2], vectors[2, 0] = 0.0, np.nan
    with pytest.raises(ModelError, match="for 1 of 3 images"):
        normalize(vectors)
