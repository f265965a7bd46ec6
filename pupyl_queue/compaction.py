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

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import StoreDamaged
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
        self._checks: dict[str, str] = {}  # store key -> sha256 of every input that has one
        self._written: dict[str, tuple[str, int]] = {}  # merged vector file -> (sha256, size)

    def _inputs(self, previous: dict[str, Any] | None, watermark: int) -> tuple[list[str], set[int]]:
        """Files holding every vector up to ``watermark``, and every tombstone."""
        files = list(previous["vector_files"]) if previous else []
        tombstones: set[int] = set()
        if previous:
            dead = integrity.snapshot_file(self.store, previous, "tombstones.npy")
            tombstones.update(np.frombuffer(dead, np.int64).tolist())
            self._checks.update(previous.get("vector_sha256", {}))
        since = previous["watermark"] if previous else 0
        commits = [(seq, key) for seq, key in self.coord.commits_after(since) if seq <= watermark]
        self._checks.update(
            {k: v for k, v in integrity.checksums(self.coord, [k for _, k in commits]).items() if v}
        )
        for _, key in commits:
            if key.split("/")[-2] == C.STORE_TOMBSTONES:
                data = self.store.get(key)
                try:
                    reason = integrity.problem(data, self._checks.get(key))
                    image_id = int(json.loads(data)["id"]) if reason is None else None
                except (ValueError, KeyError, TypeError):
                    image_id, reason = None, "not a tombstone"
                if image_id is None:  # the key names the id (tombstones/<id>.json): the removal still wins
                    integrity.report(
                        self.coord, key, f"{reason}; applied by the id in its name", "compaction"
                    )
                    image_id = int(key.rsplit("/", 1)[-1].split(".")[0])
                tombstones.add(image_id)
            else:
                files.append(key)
        return files, tombstones

    def _base(self) -> dict[str, Any] | None:
        """The newest published snapshot whose every file matches its manifest, else None.

        A damaged one is reported and passed over for the one before it, so a
        damaged snapshot is never built upon; compacting from the older one
        (plus the commits after it, which GC keeps) also rewrites the damaged
        version when the watermark has not moved.
        """
        candidates, _ = integrity.snapshot_candidates(self.store, self.coord)
        for base in candidates:
            try:
                manifest = integrity.open_manifest(self.store, base)
                if not integrity.log_complete_after(self.coord, int(manifest["watermark"])):
                    continue
                for name in manifest["files"]:  # the index too: a reader would find it damaged
                    integrity.snapshot_file(self.store, manifest, name)
                checks = manifest.get("vector_sha256", {})
                for key in manifest["vector_files"]:
                    integrity.read_checked(self.store, key, checks.get(key))
                return manifest
            except StoreDamaged as exc:
                integrity.report(self.coord, exc.key, exc.reason, by="compaction")
        if candidates and not integrity.log_complete_after(self.coord, 0):
            raise StoreDamaged(
                candidates[0], "no whole snapshot to compact from, and the commit log was trimmed"
            )
        return None

    def _chunks(self, files: list[str], tombstones: set[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        dead = np.fromiter(tombstones, dtype=np.int64, count=len(tombstones))
        for key in files:
            try:
                # Never bake damaged bytes into a snapshot: GC would then delete the only evidence.
                data = integrity.read_checked(self.store, key, self._checks.get(key))
                try:
                    ids, vectors = decode_segment(data)
                except Exception as exc:  # noqa: BLE001 - any decode failure is damage
                    raise StoreDamaged(key, f"unreadable ({type(exc).__name__})") from None
            except StoreDamaged as exc:
                integrity.report(self.coord, exc.key, exc.reason, by="compaction")
                raise
            live = ~np.isin(ids, dead)
            yield ids[live], vectors[live]

    def run(self, model: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        previous = self._base()
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
        manifest = integrity.seal(
            {
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
                "files": {name: integrity.sha256(data) for name, data in blobs.items()},
                "sizes": {name: len(data) for name, data in blobs.items()},
                "vector_sha256": {key: self._written[key][0] for key in merged},
                "build_s": round(built_s, 3),
                "created_at": time.time(),
            }
        )
        # The manifest, then the pointer, last: a reader sees a snapshot only once all of it is written.
        self.store.put(f"{base}/manifest.json", json.dumps(manifest, indent=2).encode())
        self.store.put(
            self.layout.snapshot_pointer, json.dumps({"path": base, "watermark": watermark}).encode()
        )
        self.coord.set_snapshot_watermark(watermark)
        # A damaged version at this watermark was just rewritten whole.
        integrity.forget_damage_under(self.coord, base + "/")
        self._collect_garbage()
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
        data = encode_segment(all_ids, all_vectors)
        self.store.put(key, data)
        self._written[key] = (integrity.sha256(data), len(data))
        return key

    def _collect_garbage(self) -> None:
        """Keep the newest PUPYL_SNAPSHOT_KEEP complete snapshots, and every commit the oldest of them needs.

        A searcher that finds the newest snapshot damaged falls back to an older
        one plus the commits after its watermark, so those commits (and their
        segments and tombstones) stay until that snapshot goes. Snapshot folders
        without a manifest and vector files without a snapshot are what a killed
        compaction left behind: never published, they go too.
        """
        folder = f"{self.layout.root}/{C.STORE_SNAPSHOTS}"
        versions = sorted(name for name in self.store.children(folder) if name.isdigit())
        damaged = {key[len(folder) + 1 :].split("/")[0] for key in integrity.damaged_keys(self.coord)}
        whole = [n for n in versions if n not in damaged and self.store.exists(f"{folder}/{n}/manifest.json")]
        keep = max(1, self.settings.snapshot_keep)
        kept = set(whole[-keep:])
        deleted: list[str] = []
        for name in versions:
            if name not in kept:
                deleted += list(self.store.list(f"{folder}/{name}/"))
                self.store.delete_prefix(f"{folder}/{name}/")
        for key in self.store.list(f"{self.layout.root}/{C.STORE_VECTORS}/"):
            if key.rsplit("/", 1)[-1].split("-", 1)[0] not in kept:
                self.store.delete(key)
                deleted.append(key)
        # Until there are PUPYL_SNAPSHOT_KEEP of them, replaying the whole log is the fallback: keep it.
        oldest = int(min(kept)) if len(kept) >= keep else 0
        for sequence, key in self.coord.commits_after(0):
            if sequence > oldest:
                break
            self.store.delete(key)  # inside every kept snapshot: no reader needs it any more
            deleted.append(key)
        if oldest:
            self.coord.trim_commits(oldest)
        integrity.forget(self.coord, deleted)
