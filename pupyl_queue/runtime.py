"""Per-process resources of a worker: settings, store, Redis, models, searchers.

Built lazily on first use inside the worker process (after Celery forks) and
kept for the life of the process, so a task never pays for a model load twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import redis

from pupyl_queue import priority
from pupyl_queue.collection import model_spec
from pupyl_queue.coordination import Coordinator, connect
from pupyl_queue.decode_pool import DecodePool, default_processes, pinned_cpus, shared_pool
from pupyl_queue.layout import Layout
from pupyl_queue.models import FeatureExtractor, ModelError, ModelSpec, extractor_for
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectStore, open_store

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.RLock()  # index_bytes() is called under it too
        self._searchers: OrderedDict[str, Searcher] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._decode_pool: DecodePool | None = None
        self._int8_models: dict[tuple[str, ModelSpec], object] = {}

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.settings.broker_url)

    def coordinator(self, collection: str) -> Coordinator:
        return Coordinator(self.redis, Layout(collection))

    def spec(self, collection: str) -> ModelSpec:
        """The collection's model, from Redis (one GET; set at creation), else from its manifest."""
        layout = Layout(collection)
        claim = self.redis.get(layout.key("model"))
        if claim is not None:
            return ModelSpec.from_json(json.loads(claim))
        spec = model_spec(self.store, layout)
        self.redis.set(layout.key("model"), json.dumps(spec.to_json(), sort_keys=True), nx=True)
        return spec

    def device(self) -> dict[str, object]:
        from pupyl_queue.models import configure_backend

        return configure_backend(self.settings.tf_threads, self.settings.mixed_precision)

    def infer_batch(self) -> int:
        """Images per forward pass: PUPYL_INFER_BATCH, else 128 on a GPU and 32 on CPU."""
        return self.settings.infer_batch or (128 if self.device()["gpus"] else 32)

    def pool(self) -> ThreadPoolExecutor:
        """Decode and store-write threads, shared by this process's tasks."""
        with self._lock:
            if self._pool is None:
                workers = self.settings.decode_threads or max(2, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pupyl-decode")
            return self._pool

    def decode_pool(self) -> DecodePool | None:
        """The embed stage's decode processes (PUPYL_DECODE_PROCESSES), or None: decode in threads."""
        with self._lock:
            if self._decode_pool is None:
                processes = default_processes(self.settings.decode_processes)
                if processes == 0:
                    return None
                pin = pinned_cpus(int(self.device()["gpus"]))
                if pin and self.settings.decode_processes < 0:
                    processes = len(pin)
                self._decode_pool = shared_pool(processes, pin)
            return self._decode_pool

    def extractor(self, collection: str) -> FeatureExtractor:
        """The collection's extractor, float or int8 (then its own network, quantized)."""
        self.device()
        spec = self.spec(collection)
        # Whitening is applied by the index, not the network: one extractor (and one int8 conversion)
        # serves a model with or without it.
        float_spec = spec.with_precision("float32").with_whitening("none")
        model_file = None
        if spec.kind == "keras":
            model_file = self._local_model_file(collection, spec)
        extractor = extractor_for(float_spec, self.settings.weights, model_file)
        if spec.precision == "int8":
            return self._int8(collection, spec, extractor)  # type: ignore[return-value]
        return extractor

    def lower_network_threads(self, extractor: FeatureExtractor) -> None:
        """On a CPU embed worker, the network's threads run below the rest of the host (priority.py).

        Called for each batch: a backend starts its threads on its first forward pass.
        """
        nice = self.settings.network_nice
        if not nice or self.device()["gpus"]:
            return
        priority.lower(extractor.compute_threads(), nice)  # a thread already as nice is left alone

    def _int8(self, collection: str, spec: ModelSpec, extractor: FeatureExtractor) -> object:
        from pupyl_queue.int8 import Int8Extractor, convert, source_hash

        with self._lock:  # keyed by the spec too: a collection deleted and made again gets a new model
            found = self._int8_models.get((collection, spec))
            if found is not None:
                return found
        layout = Layout(collection)
        key = layout.int8_model(source_hash(extractor))
        if not self.store.exists(key):
            # One conversion per collection, whatever the number of workers asking at once.
            with self.redis.lock(layout.key("int8-convert"), timeout=1800, blocking_timeout=1800):
                if not self.store.exists(key):
                    calibration = self._calibration(layout, extractor.input_size)
                    log.info("converting %s to int8 on %d images", spec.label, len(calibration))
                    self.store.put(key, convert(extractor, calibration))
        model = Int8Extractor(spec, self.store.get(key), extractor.preprocess, self.settings.tf_threads)
        with self._lock:
            return self._int8_models.setdefault((collection, spec), model)

    def _calibration(self, layout: Layout, size: int) -> np.ndarray:
        """The collection's calibration images (saved by its first job), else its stored images."""
        from pupyl_queue.images import ImageError, decode
        from pupyl_queue.int8 import CALIBRATION_IMAGES

        keys = list(self.store.list(layout.calibration + "/"))
        if not keys:
            keys = [k for k in self.store.list(f"{layout.root}/images/") if k.endswith(".jpg")]
        step = max(1, len(keys) // CALIBRATION_IMAGES)
        pixels = []
        for key in keys[::step][:CALIBRATION_IMAGES]:
            try:
                pixels.append(decode(self.store.get(key), self.settings.max_pixels, target=size).pixels(size))
            except ImageError:
                continue
        if not pixels:
            raise ModelError(f"collection {layout.collection!r} has no images to calibrate its int8 model on")
        return np.stack(pixels)

    def _local_model_file(self, collection: str, spec: ModelSpec) -> Path:
        """A collection's own model, copied once from the store to the data dir."""
        path = self.settings.data_dir / "models" / f"{spec.sha256}.keras"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            # A private temp name: other threads and processes may fetch the same file at once.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.store.get(Layout(collection).model_file))
            os.replace(tmp, path)
        return path

    @property
    def is_router(self) -> bool:
        """A search worker of a sharded cluster that holds no shard: it fans queries out."""
        return self.settings.search_shards > 1 and self.settings.search_shard < 0

    def searcher(self, collection: str) -> Searcher:
        with self._lock:
            found = self._searchers.get(collection)
            if found is not None:
                self._searchers.move_to_end(collection)  # most recently used
            else:
                s = self.settings
                shard = (s.search_shard, s.search_shards) if s.search_shard >= 0 else None
                found = Searcher(
                    self.store,
                    self.coordinator(collection),
                    Layout(collection),
                    s.index_nprobe,
                    shard,
                    s.data_dir / "tmp",
                    room=self._room,
                )
                found.load()
                self._searchers[collection] = found
                self._evict(keep=collection)
            return found

    def index_bytes(self) -> int:
        """Memory the loaded indexes hold: a search worker's size beyond its code."""
        with self._lock:
            return sum(s.memory_bytes() for s in self._searchers.values())

    def _room(self, need: int) -> bool:
        """Whether ``need`` more bytes (a snapshot loading beside a live index) fit PUPYL_SEARCH_MEMORY_GB."""
        with self._lock:
            return self.index_bytes() + need <= self.settings.search_memory_gb * 1024**3

    def _evict(self, keep: str) -> None:
        """Unload the least recently used collections while the indexes exceed PUPYL_SEARCH_MEMORY_GB."""
        budget = self.settings.search_memory_gb * 1024**3
        while self.index_bytes() > budget and len(self._searchers) > 1:
            name = next(iter(self._searchers))
            if name == keep:
                break
            log.info("unloading collection %s (search memory budget)", name)
            del self._searchers[name]


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(Settings.from_env())
        return _runtime
