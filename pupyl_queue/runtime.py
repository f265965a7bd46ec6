"""Per-process resources of a worker: settings, store, Redis, models, searchers.

Built lazily on first use inside the worker process (after Celery forks) and
kept for the life of the process, so a task never pays for a model load twice.
"""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import redis

from pupyl_queue.collection import model_spec
from pupyl_queue.coordination import Coordinator, connect
from pupyl_queue.layout import Layout
from pupyl_queue.models import FeatureExtractor, ModelSpec, extractor_for
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectStore, open_store


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._searchers: dict[str, object] = {}
        self._pool: ThreadPoolExecutor | None = None

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.settings.broker_url)

    def coordinator(self, collection: str) -> Coordinator:
        return Coordinator(self.redis, Layout(collection))

    def spec(self, collection: str) -> ModelSpec:
        return model_spec(self.store, Layout(collection))

    def device(self) -> dict[str, object]:
        from pupyl_queue.models import configure_tensorflow

        return configure_tensorflow(self.settings.tf_threads, self.settings.mixed_precision)

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

    def extractor(self, collection: str) -> FeatureExtractor:
        self.device()
        spec = self.spec(collection)
        model_file = None
        if spec.kind == "keras":
            model_file = self._local_model_file(collection, spec)
        return extractor_for(spec, self.settings.weights, model_file)

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

    def searcher(self, collection: str):  # type: ignore[no-untyped-def]
        from pupyl_queue.searcher import Searcher

        with self._lock:
            found = self._searchers.get(collection)
            if found is None:
                found = Searcher(self.store, self.coordinator(collection), Layout(collection))
                found.load()
                self._searchers[collection] = found
            return found

    def drop_searcher(self, collection: str) -> None:
        with self._lock:
            self._searchers.pop(collection, None)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(Settings.from_env())
        return _runtime
