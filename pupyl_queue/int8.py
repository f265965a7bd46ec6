"""int8 embed models: the collection's own network, quantized after training, run by LiteRT.

On CPU the float network is the ceiling; post-training int8 quantization of the
same network lifts it several times at (measured) no loss of retrieval quality.
The converted model is calibrated on images of the collection, converted once
per collection (a Redis lock), cached in the store under the source network's
hash, and run by LiteRT's interpreter: one interpreter per core, each image on
its own, in parallel threads (LiteRT releases the GIL while it runs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pupyl_queue.models import FeatureExtractor, ModelError, ModelSpec, normalize

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 100


def source_hash(extractor: FeatureExtractor) -> str:
    """Identity of a float network: its spec and every weight, byte for byte."""
    digest = hashlib.sha256(repr(extractor.spec.with_precision("float32")).encode())
    for weight in extractor._model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def convert(extractor: FeatureExtractor, calibration: np.ndarray) -> bytes:
    """Full-integer quantization (int8 weights and activations), float32 in and out.

    The converter is TensorFlow's: it runs on a worker whose Keras backend is
    TensorFlow. The converted model, cached in the store, then runs anywhere (LiteRT).
    """
    if extractor.backend != "tensorflow":
        raise ModelError(
            f"int8 conversion needs the TensorFlow backend, this worker runs Keras on {extractor.backend}: "
            "run one embed worker with KERAS_BACKEND=tensorflow to convert this collection's model once"
        )
    import tensorflow as tf

    if len(calibration) == 0:
        raise ValueError("int8 conversion needs calibration images")
    size = extractor.input_size
    model = extractor._model
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    forward = tf.function(lambda x: model(x, training=False))
    # Weights become constants: LiteRT then quantizes them instead of keeping resource variables.
    concrete = convert_variables_to_constants_v2(
        forward.get_concrete_function(tf.TensorSpec([1, size, size, 3], tf.float32))
    )

    def representative() -> Any:
        for image in calibration:
            yield [extractor.preprocess(image[None].astype(np.float32))]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with tempfile.TemporaryDirectory() as tmp:  # the converter writes scratch files to the cwd
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            with warnings.catch_warnings():
                # Our input stays float32 (quantized inside the model): no input statistics needed.
                warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
                return bytes(converter.convert())
        finally:
            os.chdir(cwd)


class Int8Extractor:
    """Same interface as FeatureExtractor: uint8 RGB batches in, L2-normalised vectors out."""

    def __init__(self, spec: ModelSpec, tflite: bytes, preprocess: Any, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.spec = spec
        self.preprocess = preprocess
        count = threads or os.cpu_count() or 1
        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(count):
            interpreter = Interpreter(model_content=tflite, num_threads=1)
            interpreter.allocate_tensors()
            self._free.put(interpreter)
        self._threads: list[int] = []  # the pool's native thread ids (priority.py lowers them)
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="pupyl-litert", initializer=self._started)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def _started(self) -> None:
        self._threads.append(threading.get_native_id())

    def compute_threads(self) -> list[int]:
        """The threads that run the interpreters (LiteRT runs each on its caller's thread)."""
        return list(self._threads)

    def _one(self, image: np.ndarray) -> np.ndarray:
        interpreter = self._free.get()
        try:
            entry = interpreter.get_input_details()[0]
            interpreter.set_tensor(entry["index"], image[None])
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1).copy()
        finally:
            self._free.put(interpreter)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected (n, {self.input_size}, {self.input_size}, 3), got {batch.shape}")
        x = self.preprocess(batch.astype(np.float32))
        rows = list(self._pool.map(self._one, x))
        return normalize(np.stack(rows).astype(np.float32))
