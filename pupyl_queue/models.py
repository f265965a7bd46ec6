"""Feature extractors: the nine characteristics and a user's own Keras model.

A collection fixes its model in its manifest as a :class:`ModelSpec` (plain
JSON). Workers turn a spec into a resident :class:`FeatureExtractor` once per
process (:func:`extractor_for`); TensorFlow is imported only there, after any
fork, because TensorFlow is not fork-safe.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pupyl_queue.characteristics import Characteristic

log = logging.getLogger(__name__)

METRIC = "cosine"
PRECISIONS = ("float32", "int8")  # inner product on L2-normalised vectors; distance = 1 - cosine


class ModelError(RuntimeError):
    """A model cannot be built or loaded; the message says what was tried and how to fix it."""


class ModelMismatchError(ValueError):
    """A request names another model than the one its collection was created with."""


@dataclass(frozen=True)
class ModelSpec:
    """What a collection's vectors come from; equal specs give comparable vectors."""

    kind: str  # "characteristic" or "keras"
    dim: int
    input_size: int
    characteristic: int = 0
    sha256: str = ""
    metric: str = METRIC
    precision: str = "float32"  # or "int8": vectors of the two are not comparable

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def label(self) -> str:
        name = (
            Characteristic(self.characteristic).name
            if self.kind == "characteristic"
            else f"keras model sha256:{self.sha256[:12]}"
        )
        return f"{name} ({self.precision})"

    def with_precision(self, precision: str) -> ModelSpec:
        return replace(self, precision=precision)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)

    @classmethod
    def for_characteristic(
        cls, characteristic: Characteristic | int | str, precision: str = "float32"
    ) -> ModelSpec:
        c = Characteristic.parse(characteristic)
        net = c.network
        return cls(
            "characteristic", net.feature_size, net.input_size, characteristic=c.value, precision=precision
        )

    def check_same(self, other: ModelSpec) -> None:
        if self != other:
            raise ModelMismatchError(
                f"this collection was created with {self.label} ({self.dim}-d); "
                f"the request asks for {other.label} ({other.dim}-d). Use the collection's "
                "model, or index into a new collection"
            )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureExtractor:
    """A built network: uint8 RGB batches in, L2-normalised float32 vectors out."""

    def __init__(self, spec: ModelSpec, model: Any, preprocess: Any) -> None:
        import tensorflow as tf

        self.spec = spec
        self._model = model
        self._preprocess = preprocess
        self._forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """The network's own preprocessing of float RGB 0..255 (none for a user's model)."""
        return x if self._preprocess is None else self._preprocess(x)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """One forward pass over a whole batch of ``(n, size, size, 3)`` uint8 images."""
        if batch.ndim != 4 or batch.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected (n, {self.input_size}, {self.input_size}, 3), got {batch.shape}")
        x = self.preprocess(batch.astype(np.float32))
        with self._lock:
            out = np.asarray(self._forward(x), dtype=np.float32)
        out = out.reshape(len(batch), -1)
        return normalize(out)


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A tiny floor: random-weight networks give valid directions at norms far below 1e-12.
    return (vectors / np.maximum(norms, 1e-30)).astype(np.float32)


_configured: dict[str, Any] = {}


def configure_tensorflow(threads: int, mixed_precision: bool) -> dict[str, Any]:
    """Thread pools and GPU options, set once per process before the first network is built.

    On CPU, TensorFlow's intra-op pool gets ``threads`` (default: every core)
    and its inter-op pool 1: a feature extractor is one chain of big ops, and
    decoding runs in our own thread pool beside it. On GPU: memory growth (so
    several processes can share a card) and, if asked, mixed precision.
    """
    if _configured:
        return _configured
    import os

    import tensorflow as tf

    cores = threads or os.cpu_count() or 1
    gpus = tf.config.list_physical_devices("GPU")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(1 if not gpus else 2)
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        log.warning("TensorFlow already initialised; thread settings unchanged: %s", exc)
    if mixed_precision and gpus:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    _configured.update(gpus=len(gpus), intra_op_threads=cores, mixed_precision=bool(mixed_precision and gpus))
    log.info("TensorFlow: %s", _configured)
    return _configured


def build_characteristic(
    characteristic: Characteristic | int | str, weights: str | Path | None
) -> FeatureExtractor:
    """Build one of the nine networks; ``weights`` is "imagenet", a file, or None (random)."""
    import keras

    c = Characteristic.parse(characteristic)
    net = c.network
    app = getattr(keras.applications, net.application)
    preprocess = getattr(keras.applications, net.preprocess_module).preprocess_input
    kwargs: dict[str, Any] = dict(
        include_top=False,
        pooling="avg",
        input_shape=(net.input_size, net.input_size, 3),
        weights=None if weights is None else str(weights),
    )
    try:
        model = app(**kwargs)
    except Exception as exc:  # Keras raises a bare Exception when a fetch fails
        if weights == "imagenet":
            raise ModelError(
                f"could not fetch the ImageNet weights of {net.application} ({c.name}) from "
                f"{net.weights_url}: {exc}. Offline, download that file elsewhere and set "
                "PUPYL_WEIGHTS to it, or to a directory holding it (a copy of ~/.keras/models "
                "from a machine that has run this characteristic works)"
            ) from exc
        raise ModelError(f"could not load weights {weights} into {net.application}: {exc}") from exc
    return FeatureExtractor(ModelSpec.for_characteristic(c), model, preprocess)


def resolve_weights(characteristic: Characteristic, weights_setting: str) -> str:
    """Map PUPYL_WEIGHTS to what Keras takes: "imagenet", or a local file that must exist."""
    if not weights_setting:
        return "imagenet"
    path = Path(weights_setting).expanduser()
    if path.is_dir():
        candidate = path / characteristic.network.weights_file
        if not candidate.is_file():
            raise ModelError(
                f"PUPYL_WEIGHTS is the directory {path}, but it holds no "
                f"{characteristic.network.weights_file} for {characteristic.name}; "
                f"fetch it from {characteristic.network.weights_url} and put it there"
            )
        return str(candidate)
    if not path.is_file():
        raise ModelError(f"PUPYL_WEIGHTS={path} is neither a weights file nor a directory")
    return str(path)


def load_keras_model(path: str | Path) -> FeatureExtractor:
    """A user's model file: RGB image in (values 0..255), one vector out."""
    import keras

    path = Path(path)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelError(f"could not load the Keras model file {path}: {exc}") from exc
    shape = tuple(model.input_shape)
    out = tuple(model.output_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] is None:
        raise ModelError(f"{path}: expected a square RGB image input, got input shape {shape}")
    if len(out) != 2 or out[1] is None:
        raise ModelError(f"{path}: expected one vector out per image, got output shape {out}")
    spec = ModelSpec("keras", int(out[1]), int(shape[1]), sha256=sha256_file(path))
    return FeatureExtractor(spec, model, None)


def wrap_mobilenet(weights: str | Path | None, out: str | Path, alpha: float = 1.0) -> Path:
    """Save a Keras MobileNet (weights file or random) as an own-model file: RGB 0..255 in, vector out.

    How to turn a Keras Applications weights file into a model any collection can
    use with PUPYL_MODEL; the preprocessing is inside the saved model.
    """
    import keras

    base = keras.applications.MobileNet(
        input_shape=(224, 224, 3),
        alpha=alpha,
        include_top=False,
        pooling="avg",
        weights=None if weights is None else str(weights),
    )
    inputs = keras.Input((224, 224, 3))
    outputs = base(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    out = Path(out)
    keras.Model(inputs, outputs).save(out)
    return out


_cache: dict[ModelSpec, FeatureExtractor] = {}
_cache_lock = threading.Lock()


def extractor_for(spec: ModelSpec, weights_setting: str, model_file: Path | None) -> FeatureExtractor:
    """The process-wide extractor for a spec, built on first use and kept resident."""
    with _cache_lock:
        found = _cache.get(spec)
        if found is not None:
            return found
        if spec.kind == "characteristic":
            c = Characteristic(spec.characteristic)
            extractor = build_characteristic(c, resolve_weights(c, weights_setting))
        elif model_file is not None:
            extractor = load_keras_model(model_file)
            if extractor.spec.sha256 != spec.sha256:
                raise ModelError(
                    f"model file {model_file} has sha256 {extractor.spec.sha256}, "
                    f"the collection expects {spec.sha256}"
                )
        else:
            raise ModelError(f"no model file for {spec.label}")
        log.info("built %s (%d-d) in this process", spec.label, spec.dim)
        _cache[spec] = extractor
        return extractor
