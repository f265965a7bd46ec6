"""The in-memory index of one collection, kept current from the commit log.

A searcher loads the newest complete snapshot, then applies every segment and
tombstone committed after the snapshot's watermark, in sequence order. Before
each search it reads one Redis counter and applies whatever is new, so a
search sees every committed write (DESIGN.md principle 3). Removal wins: a
tombstoned id is never added back, whatever order its segment arrives in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from typing import Any

import numpy as np

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore
from pupyl_queue.vector_index import VectorIndex

log = logging.getLogger(__name__)


class SnapshotDamaged(ValueError):
    """A snapshot's bytes do not match its manifest."""


def encode_segment(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, ids=np.asarray(ids, dtype=np.int64), vectors=np.asarray(vectors, dtype=np.float32))
    return out.getvalue()


def decode_segment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["ids"], npz["vectors"]


class Searcher:
    def __init__(self, store: ObjectStore, coordinator: Coordinator, layout: Layout) -> None:
        self.store = store
        self.coord = coordinator
        self.layout = layout
        self.index: VectorIndex | None = None
        self.sequence = 0  # every commit up to here is applied
        self.tombstones: set[int] = set()
        self._seen_changes = -1
        self._lock = threading.RLock()

    # --- loading
    def load(self) -> None:
        with self._lock:
            self._load_snapshot()
            self.refresh(force=True)

    def _load_snapshot(self) -> None:
        try:
            pointer = json.loads(self.store.get(self.layout.snapshot_pointer))
        except ObjectNotFound:
            return
        base = pointer["path"]
        manifest = json.loads(self.store.get(f"{base}/manifest.json"))
        data = self.store.get(f"{base}/index.faiss")
        if hashlib.sha256(data).hexdigest() != manifest["index_sha256"]:
            raise SnapshotDamaged(f"snapshot {base} index does not match its checksum")
        self.index = VectorIndex.deserialize(data, manifest["dim"])
        self.tombstones = set(json.loads(self.store.get(f"{base}/tombstones.json")))
        self.sequence = int(manifest["watermark"])
        log.info("loaded snapshot %s: %d vectors at sequence %d", base, len(self.index), self.sequence)

    def refresh(self, force: bool = False) -> int:
        """Apply every commit newer than what is loaded; returns how many were applied."""
        with self._lock:
            changes = self.coord.changes()
            if not force and changes == self._seen_changes:
                return 0
            applied = 0
            for sequence, key in self.coord.commits_after(self.sequence):
                self._apply(key)
                self.sequence = sequence
                applied += 1
            self._seen_changes = changes
            return applied

    def _apply(self, key: str) -> None:
        kind = key.split("/")[-2]
        if kind == C.STORE_TOMBSTONES:
            image_id = int(json.loads(self.store.get(key))["id"])
            self.tombstones.add(image_id)
            if self.index is not None:
                self.index.remove([image_id])
        elif kind == C.STORE_SEGMENTS:
            ids, vectors = decode_segment(self.store.get(key))
            keep = np.array([int(i) not in self.tombstones for i in ids], dtype=bool)
            if self.index is None:
                self.index = VectorIndex(int(vectors.shape[1]))
            self.index.add(ids[keep], vectors[keep])
        else:
            raise ValueError(f"unknown commit object {key}")

    # --- reading
    def wait_for(self, sequence: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if self.sequence >= sequence:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def search(self, vector: np.ndarray, top: int) -> list[tuple[int, float]]:
        with self._lock:
            self.refresh()
            if self.index is None:
                return []
            return self.index.search(vector[None, :], top)[0]

    def search_many(self, vectors: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
        with self._lock:
            self.refresh()
            if self.index is None:
                return [[] for _ in range(len(vectors))]
            return self.index.search(vectors, top)

    def vector(self, image_id: int) -> np.ndarray:
        with self._lock:
            self.refresh()
            if self.index is None or image_id not in self.index:
                raise KeyError(f"no image with id {image_id} in collection {self.layout.collection!r}")
            return self.index.vector(image_id)

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    # --- snapshots
    def write_snapshot(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Write a complete snapshot, then publish the pointer to it."""
        with self._lock:
            self.refresh(force=True)
            if self.index is None:
                raise ValueError("nothing to snapshot yet")
            data = self.index.serialize()
            tombstones = json.dumps(sorted(self.tombstones)).encode()
            manifest = {
                "schema": C.SCHEMA_VERSION,
                "model": spec,
                "dim": self.index.dim,
                "metric": spec.get("metric", "cosine"),
                "index_type": "IDMap2,Flat",
                "watermark": self.sequence,
                "count": len(self.index),
                "tombstones": len(self.tombstones),
                "index_sha256": hashlib.sha256(data).hexdigest(),
                "created_at": time.time(),
            }
            base = self.layout.snapshot(self.sequence)
        self.store.put(f"{base}/index.faiss", data)
        self.store.put(f"{base}/tombstones.json", tombstones)
        self.store.put(f"{base}/manifest.json", json.dumps(manifest, indent=2).encode())
        pointer = {"path": base, "watermark": manifest["watermark"]}
        self.store.put(self.layout.snapshot_pointer, json.dumps(pointer).encode())
        return manifest
