"""Feature extractors: the nine characteristics and a user's own Keras model.

A collection fixes its model in its manifest as a :class:`ModelSpec` (plain
JSON). Workers turn a spec into a resident :class:`FeatureExtractor` once per
process (:func:`extractor_for`); Keras and its backend (TensorFlow, JAX or
PyTorch) are imported only there, after any fork, because none is fork-safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pupyl_queue.characteristics import Characteristic
from pupyl_queue.constants import DEFAULT_DESCRIPTOR, DEFAULT_WHITENING, DESCRIPTORS
from pupyl_queue.priority import native_threads
from pupyl_queue.whitening import check_whitening

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
    descriptor: str = DEFAULT_DESCRIPTOR  # pooling of the last feature maps (constants.DESCRIPTORS)
    # PCA whitening learned at compaction (pupyl_queue/whitening.py): "none", "pca" or "pca:<s>". Not
    # the network's: the extractor is the same (Runtime.extractor drops it); the vectors compared are not.
    # Out of repr: int8.source_hash hashes the repr, and existing int8 models must keep their key.
    whitening: str = field(default=DEFAULT_WHITENING, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {self.descriptor!r}")
        object.__setattr__(self, "whitening", check_whitening(self.whitening))

    @property
    def label(self) -> str:
        if self.kind == "characteristic":
            name = Characteristic(self.characteristic).name
        elif self.kind == "null":
            name = "null extractor (benchmarks only)"
        else:
            name = f"keras model sha256:{self.sha256[:12]}"
        details = [self.precision]
        if self.descriptor != DEFAULT_DESCRIPTOR:
            details.append(f"{self.descriptor} descriptor")
        if self.whitening != DEFAULT_WHITENING:
            details.append(f"{self.whitening} whitening")
        return f"{name} ({', '.join(details)})"

    def with_precision(self, precision: str) -> ModelSpec:
        return replace(self, precision=precision)

    def with_descriptor(self, descriptor: str) -> ModelSpec:
        return replace(self, descriptor=descriptor)

    def with_whitening(self, whitening: str) -> ModelSpec:
        return replace(self, whitening=whitening)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the manifest; the default descriptor and whitening are left out, so a
        collection made before either existed and one made with the defaults write the same manifest
        (and an old manifest reads as avg, no whitening)."""
        data = asdict(self)
        if data["descriptor"] == DEFAULT_DESCRIPTOR:
            del data["descriptor"]
        if data["whitening"] == DEFAULT_WHITENING:
            del data["whitening"]
        return data

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

    @classmethod
    def null(cls, dim: int = 1024, input_size: int = 224) -> ModelSpec:
        """The spec of :class:`NullExtractor`; only a collection created for a benchmark has it."""
        return cls("null", dim, input_size)

    def check_same(self, other: ModelSpec) -> None:
        if self != other:
            raise ModelMismatchError(
                f"this collection was created with {self.label} ({self.dim}-d); "
                f"the request asks for {other.label} ({other.dim}-d). Use the collection's "
                "model, or index into a new collection"
            )


def check_descriptor(descriptor: str) -> str:
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {descriptor!r}")
    return descriptor


def descriptor_model(model: Any, descriptor: str) -> Any:
    """The network with the collection's global descriptor: what ``model`` pools, pooled otherwise.

    ``gem``: each global average pooling layer of the network (nested models included) that
    makes its vector (nothing after it is a feature map again: not a squeeze-and-excite block's) is
    replaced by generalized-mean pooling, p = 3, the other layers shared, weights and all: it
    weighs the strongest activations more, which finds edited copies better and similar photos
    no worse (bench/copies.py --pooling). ``+mirror``: the network runs on the image and on its
    mirror image and the two unit vectors are summed (normalized again by ``embed``): a mirrored
    copy then has its original's vector, at twice the inference cost. A model whose output is
    not a global average pooling has no ``gem`` form: a clear error.
    """
    import keras

    GeneralizedMeanPooling, WithMirrorImages, UnitSum = _descriptor_layers()
    pooling, _, mirror = descriptor.partition("+")
    if pooling == "gem":
        swapped: list[str] = []
        descriptors = {
            id(layer)
            for layer in model._flatten_layers()
            if isinstance(layer, keras.layers.GlobalAveragePooling2D) and not _feeds_feature_maps(layer)
        }

        def swap(layer: Any) -> Any:
            if id(layer) in descriptors:
                swapped.append(layer.name)
                return GeneralizedMeanPooling(layer.data_format, name=f"{layer.name}_gem")
            return layer

        model = keras.models.clone_model(model, clone_function=swap, recursive=True)
        if not swapped:
            raise ModelError(
                "the gem descriptor replaces the network's global average pooling, and this model "
                "has none (its output is pooled another way): use the avg descriptor"
            )
    if mirror:  # one call on the batch and its mirror images: fewer, larger ops than two calls
        inputs = keras.Input(tuple(model.input_shape[1:]))
        width_axis = 3 if channels_first(model) else 2
        model = keras.Model(inputs, UnitSum()(model(WithMirrorImages(width_axis)(inputs))))
    return model


def _feeds_feature_maps(layer: Any) -> bool:
    """Whether anything downstream of ``layer`` in its network is a feature map again (rank 4).

    A global average pooling that does is inside the network, as in EfficientNetV2's
    squeeze-and-excite blocks (pool, reshape to 1 x 1, gate the maps): swapping those for
    generalized means would change the network itself (its gates), not its descriptor.
    """
    stack, seen = [layer], {id(layer)}
    while stack:
        for node in stack.pop()._outbound_nodes:
            if any(len(tensor.shape) == 4 for tensor in node.outputs):
                return True
            if id(node.operation) not in seen:
                seen.add(id(node.operation))
                stack.append(node.operation)
    return False


def channels_first(model: Any) -> bool:
    """Whether a network takes (n, 3, size, size): how the characteristics are built on PyTorch."""
    shape = tuple(model.input_shape)
    return len(shape) == 4 and shape[1] == 3 and shape[3] != 3


@functools.cache
def _descriptor_layers() -> tuple[type, type, type]:
    """Keras layers of the descriptors, defined on first use (Keras is imported only in workers)."""
    import keras

    class GeneralizedMeanPooling(keras.layers.Layer):
        """(mean over positions of x^p)^(1/p), p = 3: between average (p = 1) and max pooling."""

        def __init__(self, data_format: str = "channels_last", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.axes = (2, 3) if data_format == "channels_first" else (1, 2)

        def call(self, x: Any) -> Any:
            cubes = keras.ops.power(keras.ops.maximum(x, 1e-6), 3.0)
            return keras.ops.power(keras.ops.mean(cubes, axis=self.axes), 1.0 / 3.0)

    class WithMirrorImages(keras.layers.Layer):
        """A batch of n images followed by their n mirror images (flipped along ``width_axis``)."""

        def __init__(self, width_axis: int = 2, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.width_axis = width_axis

        def call(self, x: Any) -> Any:
            return keras.ops.concatenate([x, keras.ops.flip(x, axis=self.width_axis)], axis=0)

    class UnitSum(keras.layers.Layer):
        """Each of the first n vectors as a unit vector, plus its mirror image's (the last n)."""

        def call(self, x: Any) -> Any:
            x = keras.ops.reshape(x, (keras.ops.shape(x)[0], -1))
            x = x / keras.ops.maximum(keras.ops.norm(x, axis=1, keepdims=True), 1e-30)
            plain, mirrored = keras.ops.split(x, 2, axis=0)
            return plain + mirrored

        def compute_output_shape(self, shape: tuple[Any, ...]) -> tuple[Any, ...]:
            # Half the batch; said outright, as JAX cannot split a symbolic batch dimension in two.
            return (None if shape[0] is None else shape[0] // 2, math.prod(shape[1:]))

    return GeneralizedMeanPooling, WithMirrorImages, UnitSum


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureExtractor:
    """A built network: uint8 RGB batches in, L2-normalised float32 vectors out.

    The forward pass is compiled once per Keras backend (:func:`compile_forward`)
    and takes the uint8 batch as it is: the cast and the network's own
    preprocessing run inside the compiled function, so a GPU receives a quarter
    of the bytes float32 would need and the host does no per-pixel work.
    """

    def __init__(self, spec: ModelSpec, model: Any, preprocess: Any) -> None:
        import keras

        self.spec = spec
        self.backend = keras.backend.backend()
        self._model = model
        self._preprocess = preprocess
        self._forward = compile_forward(model, preprocess, self.backend)
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """The network's own preprocessing of float RGB 0..255 on the host (int8 calibration uses it)."""
        return x if self._preprocess is None else self._preprocess(x)

    def with_descriptor(self, descriptor: str) -> FeatureExtractor:
        """The same network with another global descriptor (``descriptor_model``), weights shared."""
        model = descriptor_model(self._model, check_descriptor(descriptor))
        return FeatureExtractor(self.spec.with_descriptor(descriptor), model, self._preprocess)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """One forward pass over a whole batch of ``(n, size, size, 3)`` uint8 images."""
        check_batch(batch, self.input_size)
        with self._lock:
            out = self._forward(np.ascontiguousarray(batch, dtype=np.uint8))
        return normalize(out.reshape(len(batch), -1))

    def compute_threads(self) -> list[int]:
        """The threads the backend computes on besides the caller's: its native pools
        (process-wide: every Keras model of this process shares them)."""
        return native_threads()


class NullExtractor(FeatureExtractor):
    """An extractor that costs nothing: the same unit vector for every image, at the spec's dimension.

    It measures what the rest of the system (fetch, decode, dedup, store,
    Redis, Celery) can move when the network is free: the proxy of a GPU
    worker on a machine without one (bench/ingest.py --model null).
    """

    backend = "none"

    def __init__(self, spec: ModelSpec) -> None:  # no network: nothing of the parent's to build
        self.spec = spec
        self._model = None
        self._preprocess = None
        self._vector = normalize(np.ones((1, spec.dim), np.float32))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        check_batch(batch, self.input_size)
        return np.repeat(self._vector, len(batch), axis=0)

    def compute_threads(self) -> list[int]:
        return []


def check_batch(batch: np.ndarray, size: int) -> None:
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise ValueError(f"expected (n, {size}, {size}, 3), got {batch.shape}")


def compile_forward(model: Any, preprocess: Any, backend: str) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled ``uint8 batch -> float32 features`` for this process's Keras backend.

    TensorFlow: a ``tf.function`` with an unknown batch dimension (one trace).
    JAX: ``jax.jit`` of the model's stateless call, its weights passed in as
    arguments; batches are padded to a power of two so that a stream of odd
    sizes compiles a handful of times, not once per size. PyTorch: eager under
    ``no_grad``, through ``eager_graph.call`` (Keras' own call keeps every activation
    alive until it returns). The preprocessing is written with ``keras.ops`` by Keras, so
    the same function traces on each backend. A channels-first network (the
    characteristics on PyTorch) gets the batch transposed once, after the preprocessing.
    """
    import keras

    size = int(model.input_shape[-1 if channels_first(model) else 1])
    transpose = channels_first(model)

    def features(x: Any) -> Any:
        x = keras.ops.cast(x, "float32")
        if preprocess is not None:  # on (n, size, size, 3), as the network's own preprocessing expects
            x = preprocess(x)
        return keras.ops.transpose(x, (0, 3, 1, 2)) if transpose else x

    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None, size, size, 3], tf.uint8)
        forward = tf.function(lambda x: model(features(x), training=False), input_signature=[spec])
        return lambda batch: forward(batch).numpy().astype(np.float32, copy=False)
    if backend == "jax":
        import jax

        def pure(trainable: Any, frozen: Any, x: Any) -> Any:
            out, _ = model.stateless_call(trainable, frozen, features(x), training=False)
            return keras.ops.cast(out, "float32")

        jitted = jax.jit(pure)

        def run(batch: np.ndarray) -> np.ndarray:
            n = len(batch)
            padded = _bucket(n)
            if padded != n:
                batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
            # The weights as they are now (a list of references, no copy), as TensorFlow and PyTorch
            # read them: captured once, a set_weights after the build went unseen on JAX alone.
            trainable = [v.value for v in model.trainable_variables]
            frozen = [v.value for v in model.non_trainable_variables]
            return np.asarray(jitted(trainable, frozen, batch))[:n]

        return run
    if backend == "torch":
        import torch

        from pupyl_queue import eager_graph

        def eager(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():  # each activation let go after its last reader (eager_graph)
                out = eager_graph.call(model, features(keras.ops.convert_to_tensor(batch)))
                return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))

        return eager
    raise ModelError(f"Keras backend {backend!r} is not supported: use tensorflow, jax or torch")


def _bucket(n: int) -> int:
    """The batch size a compiled JAX call runs at: the next power of two (at least 8)."""
    return max(8, 1 << (n - 1).bit_length())


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors; a network that gave an inf or a NaN (an overflow) is an error, not a vector:
    FAISS would rank every query against it as garbage, and no later step would notice."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ModelError(
            f"the network gave non-finite values (inf or NaN) for {int(bad.sum())} of {len(vectors)} "
            "images: an overflow in the model (with PUPYL_MIXED_PRECISION=true, float16's range; "
            "turn it off for this network)"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A tiny floor: random-weight networks give valid directions at norms far below 1e-12.
    return (vectors / np.maximum(norms, 1e-30)).astype(np.float32)


_configured: dict[str, Any] = {}


def configure_backend(threads: int, mixed_precision: bool) -> dict[str, Any]:
    """Thread pools and GPU options of this process's Keras backend, set once before the first network.

    The backend is Keras' (``KERAS_BACKEND``, read when Keras is first imported):
    TensorFlow by default and on CPU; JAX or PyTorch where those are the simpler
    GPU install. It is fixed for the life of the process.

    TensorFlow on CPU: the intra-op pool gets ``threads`` (default: every core)
    and the inter-op pool 1: a feature extractor is one chain of big ops, and
    decoding runs beside it. On GPU: memory growth (so several processes can share
    a card) and, if asked, mixed precision: float16 on every backend. A collection
    does not record it, so its vectors must stay beside float32 ones: float16 moves
    an image's vector by a cosine distance of ~2e-4, bfloat16 by 2-3e-2, about as
    far as the next image (bench/mixed_precision.py, real ImageNet MobileNet weights).
    """
    if _configured:
        return _configured
    import os

    import keras

    backend = keras.backend.backend()
    cores = threads or os.cpu_count() or 1
    if backend == "tensorflow":
        gpus = _configure_tensorflow(cores)
    elif backend == "jax":
        import jax

        gpus = sum(1 for d in jax.devices() if d.platform == "gpu")
    elif backend == "torch":
        import torch

        torch.set_num_threads(cores)
        gpus = torch.cuda.device_count()
    else:
        raise ModelError(f"Keras backend {backend!r} is not supported: use tensorflow, jax or torch")
    if mixed_precision and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    _configured.update(
        backend=backend, gpus=gpus, intra_op_threads=cores, mixed_precision=bool(mixed_precision and gpus)
    )
    log.info("Keras backend: %s", _configured)
    return _configured


def _configure_tensorflow(cores: int) -> int:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(1 if not gpus else 2)
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        log.warning("TensorFlow already initialised; thread settings unchanged: %s", exc)
    return len(gpus)


def build_characteristic(
    characteristic: Characteristic | int | str,
    weights: str | Path | None,
    data_format: str | None = None,
    input_size: int | None = None,
) -> FeatureExtractor:
    """Build one of the nine networks; ``weights`` is "imagenet", a file, or None (random).

    ``data_format`` and ``input_size`` default to what this backend runs: the benchmarks and
    layout tests build the same network in the other layout, or smaller, through this one path.
    """
    import keras

    c = Characteristic.parse(characteristic)
    net = c.network
    app = getattr(keras.applications, net.application)
    preprocess = getattr(keras.applications, net.preprocess_module).preprocess_input
    # On PyTorch, Keras 3.15 copies every conv's input to channels-first and back in a
    # channels-last network; built channels-first (Network.channels_first), MobileNet runs 2x
    # faster there, same vectors (bench/backends.py). The preprocessing still sees (n, size, size, 3).
    if data_format is None:
        torch_layout = keras.backend.backend() == "torch" and net.channels_first
        data_format = "channels_first" if torch_layout else "channels_last"
    size = input_size or net.input_size
    shape = (3, size, size) if data_format == "channels_first" else (size, size, 3)
    kwargs: dict[str, Any] = dict(
        include_top=False,
        pooling="avg",
        input_shape=shape,
        weights=None if weights is None else str(weights),
    )
    try:
        with _image_data_format(data_format):
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
    return FeatureExtractor(replace(ModelSpec.for_characteristic(c), input_size=size), model, preprocess)


@contextlib.contextmanager
def _image_data_format(data_format: str) -> Iterator[None]:
    """Keras' process-wide image data format for building one network (under the build lock)."""
    import keras

    before = keras.config.image_data_format()
    keras.config.set_image_data_format(data_format)
    try:
        yield
    finally:
        keras.config.set_image_data_format(before)


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
        if spec.kind == "null":
            extractor: FeatureExtractor = NullExtractor(spec)
        elif spec.kind == "characteristic":
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
        if spec.descriptor != extractor.spec.descriptor and spec.kind != "null":
            extractor = extractor.with_descriptor(spec.descriptor)
        log.info("built %s (%d-d) in this process", spec.label, spec.dim)
        _cache[spec] = extractor
        return extractor
