"""Compaction: a new snapshot version of a collection, built off the search path.

Runs on a maintenance worker, one at a time per collection (a Redis lock),
never inside a search worker, so searches are not blocked. It streams the live
vectors (the previous snapshot's merged vector files, then every later
segment), drops tombstoned ids, picks the index type for the live count,
trains it on a sample, adds everything, and writes: the index, its id bitmap,
the tombstones, merged vector files for the next compaction, and a manifest
with checksums; then it publishes the pointer. Last, it garbage-collects what
the snapshot before this one still needed (segments, vector files, snapshot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.searcher import decode_segment, encode_segment
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound, ObjectStore
from pupyl_queue.vector_index import VectorIndex, choose_factory

log = logging.getLogger(__name__)
MERGED_ROWS = 200_000  # vectors per merged vector file
TRAIN_PER_LIST = 64


def read_pointer(store: ObjectStore, layout: Layout) -> dict[str, Any] | None:
    try:
        pointer = json.loads(store.get(layout.snapshot_pointer))
        return json.loads(store.get(f"{pointer['path']}/manifest.json"))
    except ObjectNotFound:
        return None


class Compactor:
    def __init__(self, store: ObjectStore, coord: Coordinator, settings: Settings) -> None:
        self.store = store
        self.coord = coord
        self.layout = coord.layout
        self.settings = settings

    def _inputs(self, previous: dict[str, Any] | None, watermark: int) -> tuple[list[str], set[int]]:
        """Files holding every vector up to ``watermark``, and every tombstone."""
        files = list(previous["vector_files"]) if previous else []
        tombstones: set[int] = set()
        if previous:
            base = previous["path"]
            tombstones.update(np.frombuffer(self.store.get(f"{base}/tombstones.npy"), np.int64).tolist())
        since = previous["watermark"] if previous else 0
        for sequence, key in self.coord.commits_after(since):
            if sequence > watermark:
                break
            if key.split("/")[-2] == C.STORE_TOMBSTONES:
                tombstones.add(int(json.loads(self.store.get(key))["id"]))
            else:
                files.append(key)
        return files, tombstones

    def _chunks(self, files: list[str], tombstones: set[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        dead = np.fromiter(tombstones, dtype=np.int64, count=len(tombstones))
        for key in files:
            ids, vectors = decode_segment(self.store.get(key))
            live = ~np.isin(ids, dead)
            yield ids[live], vectors[live]

    def run(self, model: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        previous = read_pointer(self.store, self.layout)
        watermark = self.coord.last_sequence()
        if previous and previous["watermark"] >= watermark:
            return {**previous, "skipped": "nothing committed since the last snapshot"}
        files, tombstones = self._inputs(previous, watermark)
        count, dim = 0, 0
        for ids, vectors in self._chunks(files, tombstones):
            count += len(ids)
            dim = dim or (vectors.shape[1] if vectors.size else 0)
        dim = dim or int(model.get("dim", 0))
        s = self.settings
        factory = s.index_factory or choose_factory(
            count, dim, int(s.index_memory_gb * 1024**3), s.flat_below
        )
        index = VectorIndex(dim, factory, nprobe=s.index_nprobe)
        if not index.is_trained:
            index.train(self._sample(files, tombstones, factory, count))
        base = self.layout.snapshot(watermark)
        merged: list[str] = []
        buffer_ids: list[np.ndarray] = []
        buffer_vectors: list[np.ndarray] = []
        buffered = 0
        for ids, vectors in self._chunks(files, tombstones):
            index.add(ids, vectors)
            buffer_ids.append(ids)
            buffer_vectors.append(vectors)
            buffered += len(ids)
            if buffered >= MERGED_ROWS:
                merged.append(self._write_merged(base, len(merged), buffer_ids, buffer_vectors))
                buffer_ids, buffer_vectors, buffered = [], [], 0
        if buffered or not merged:
            merged.append(self._write_merged(base, len(merged), buffer_ids, buffer_vectors))
        built_s = time.perf_counter() - started
        blobs = {
            "index.faiss": index.serialize(),
            "ids.bits": index.ids.to_bytes(),
            "tombstones.npy": np.array(sorted(tombstones), dtype=np.int64).tobytes(),
        }
        for name, data in blobs.items():
            self.store.put(f"{base}/{name}", data)
        manifest = {
            "schema": C.SCHEMA_VERSION,
            "path": base,
            "model": model,
            "dim": dim,
            "metric": model.get("metric", "cosine"),
            "factory": factory,
            "index_type": factory if factory != "Flat" else "IDMap2,Flat",
            "nprobe": index.nprobe,
            "watermark": watermark,
            "count": len(index),
            "tombstones": len(tombstones),
            "id_bits": index.ids.size,
            "vector_files": merged,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
            "build_s": round(built_s, 3),
            "created_at": time.time(),
        }
        self.store.put(f"{base}/manifest.json", json.dumps(manifest, indent=2).encode())
        self.store.put(
            self.layout.snapshot_pointer, json.dumps({"path": base, "watermark": watermark}).encode()
        )
        self.coord.set_snapshot_watermark(watermark)
        if previous:
            self._collect_garbage(previous)
        log.info("snapshot %s: %d vectors, %s, %.1fs", base, len(index), factory, built_s)
        return manifest

    def _sample(self, files: list[str], tombstones: set[int], factory: str, count: int) -> np.ndarray:
        """An even sample of the live vectors, large enough to train ``factory``."""
        nlist = int(factory.split(",")[0].removeprefix("IVF")) if factory.startswith("IVF") else 256
        want = min(count, max(TRAIN_PER_LIST * nlist, 10_000))
        rng = np.random.default_rng(0)
        parts = []
        for _, vectors in self._chunks(files, tombstones):
            take = int(round(len(vectors) * want / max(count, 1)))
            if take:
                parts.append(vectors[rng.choice(len(vectors), min(take, len(vectors)), replace=False)])
        return np.concatenate(parts)

    def _write_merged(self, base: str, number: int, ids: list[np.ndarray], vectors: list[np.ndarray]) -> str:
        key = f"{self.layout.root}/{C.STORE_VECTORS}/{base.rsplit('/', 1)[-1]}-{number:05d}.npz"
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        self.store.put(key, encode_segment(all_ids, all_vectors))
        return key

    def _collect_garbage(self, previous: dict[str, Any]) -> None:
        """Delete what only the snapshot before ``previous`` needed; ``previous`` stays whole."""
        older = self._older_snapshots(keep=max(1, self.settings.snapshot_keep))
        for manifest in older:
            for key in manifest["vector_files"]:
                if key not in previous["vector_files"]:
                    self.store.delete(key)
            self.store.delete_prefix(manifest["path"] + "/")
        # Segments inside the previous snapshot's merged files are no longer read by anyone.
        for sequence, key in self.coord.commits_after(0):
            if sequence > previous["watermark"]:
                break
            self.store.delete(key)
        self.coord.trim_commits(previous["watermark"])

    def _older_snapshots(self, keep: int) -> list[dict[str, Any]]:
        folder = f"{self.layout.root}/{C.STORE_SNAPSHOTS}"
        versions = sorted(name for name in self.store.children(folder) if name.isdigit())
        out = []
        for name in versions[: max(0, len(versions) - keep)]:
            try:
                out.append(json.loads(self.store.get(f"{folder}/{name}/manifest.json")))
            except ObjectNotFound:
                continue
        return out
