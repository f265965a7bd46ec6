"""The in-memory index of one collection, kept current from the commit log.

A searcher loads the newest complete snapshot, then applies every segment and
tombstone committed after the snapshot's watermark, in sequence order. Before
each search it reads one Redis counter and applies whatever is new, so a
search sees every committed write (DESIGN.md principle 3). Removal wins: a
tombstoned id is never added back, whatever order its segment arrives in.
When compaction publishes a newer snapshot, the searcher loads it in a
background thread and swaps it in; searches wait only for the swap itself.
A snapshot with a whitening (pupyl_queue/whitening.py) gives its index that
transform: the commits applied after it and every query are whitened the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.attributes import AttributeTable, Filter
from pupyl_queue.codecs import ROWS_FILE, decode_segment_rows, read_pointer, read_snapshot_rows
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import StoreDamaged
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore
from pupyl_queue.vector_index import IdSet, VectorIndex, index_bytes
from pupyl_queue.whitening import Whitening

log = logging.getLogger(__name__)


SnapshotDamaged = StoreDamaged  # the name this error had before integrity.py
GC_RESTARTS = 3  # loads that may start over because GC collected the snapshot being read


class Searcher:
    def __init__(
        self,
        store: ObjectStore,
        coordinator: Coordinator,
        layout: Layout,
        nprobe: int = 0,
        shard: tuple[int, int] | None = None,
        scratch: Path | None = None,
        room: Callable[[int], bool] | None = None,
    ) -> None:
        """``room(n)``: whether ``n`` more bytes fit the search memory budget (the runtime's
        PUPYL_SEARCH_MEMORY_GB); it decides how a newer snapshot comes in (see ``_swap``)."""
        self.room = room
        self.shard = shard  # (k, n): this searcher owns the ids with id % n == k
        self.scratch = scratch  # where a snapshot index lands on its way in (None: the system's temp dir)
        self.store = store
        self.coord = coordinator
        self.layout = layout
        self.nprobe = nprobe
        self.index: VectorIndex | None = None
        self.sequence = 0  # every commit up to here is applied
        self.snapshot_watermark = 0  # the snapshot this state was loaded from
        self.tombstones: set[int] = set()
        self.table = AttributeTable()  # every live row's filterable values (attributes and built-ins)
        self._seen_changes = -1
        self._epoch = ""
        self.published_seen = 0  # the newest published snapshot looked at (loaded, or found damaged)
        self.damaged: dict[str, str] = {}  # store key -> reason, for damage this state routed around
        self.skipped: dict[str, str] = {}  # damaged segments left out: searches miss their vectors
        self._lock = threading.RLock()
        self._swapping = False
        self._incoming = 0  # bytes of a snapshot loading beside the live index (a hot swap)
        self._unloaded = False  # an in-place reload failed: the next refresh loads again, or fails

    # --- loading
    def load(self) -> None:
        with self._lock:
            self._load_snapshot()
            self.refresh(force=True)

    def _load_snapshot(self, restarts: int = GC_RESTARTS) -> None:
        """The newest published snapshot whose files all match their manifest; else an older one.

        A damaged snapshot is reported and passed over: the one before it, plus
        the commits after its watermark (GC keeps both), gives the same state.
        With none usable, the whole commit log is replayed if it is complete;
        otherwise loading fails with StoreDamaged rather than serve a partial index.
        A file gone while newer snapshots were published meanwhile is not damage:
        GC collected the superseded snapshot under this reader, which starts over
        from the newest (``restarts`` times at most; then it counts as damage).
        """
        candidates, newest = integrity.snapshot_candidates(self.store, self.coord)
        self.published_seen = max(self.published_seen, newest)
        for base in candidates:
            try:
                manifest = integrity.open_manifest(self.store, base)
                if not integrity.log_complete_after(self.coord, int(manifest["watermark"])):
                    log.warning("snapshot %s is intact but the commits after it were trimmed; skipped", base)
                    continue
                if self.shard is not None:
                    self._load_shard(manifest)
                else:
                    self._load_full(manifest)
            except StoreDamaged as exc:
                if restarts > 0 and self._collected(exc, newest):
                    log.info("%s was garbage-collected while loading; loading the newest snapshot", base)
                    self._load_snapshot(restarts - 1)
                    return
                self._damage(exc.key, exc.reason)
                continue
            if base != candidates[0]:
                log.error("serving collection %s from the older snapshot %s", self.layout.collection, base)
            return
        if not candidates:
            return
        if integrity.log_complete_after(self.coord, 0):
            log.error("no usable snapshot of %s: replaying the whole commit log", self.layout.collection)
            return
        raise StoreDamaged(
            candidates[0],
            "no usable snapshot, and the commit log no longer holds every commit (see the damaged list)",
        )

    def _collected(self, exc: StoreDamaged, newest: int) -> bool:
        """Whether a snapshot file went missing because GC collected it: a newer snapshot was published
        since this load began (GC deletes only superseded snapshots, right after publishing)."""
        return exc.reason.startswith("missing") and self.coord.snapshot_watermark() > newest

    def _damage(self, key: str, reason: str) -> None:
        self.damaged[key] = reason
        integrity.report(self.coord, key, reason, by="searcher")

    def _load_full(self, manifest: dict[str, Any]) -> None:
        base = manifest["path"]
        id_bits = integrity.snapshot_file(self.store, manifest, "ids.bits")
        dead = np.frombuffer(integrity.snapshot_file(self.store, manifest, "tombstones.npy"), np.int64)
        whitening = self._whitening(manifest)
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        # Through a file: the index is in memory once, not once more as bytes (gigabytes at 10M).
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="snapshot-") as folder:
            path = Path(folder) / "index.faiss"
            integrity.snapshot_file_to(self.store, manifest, "index.faiss", path)
            try:
                ids = IdSet.from_bytes(id_bits, manifest["id_bits"])
                index = VectorIndex.read(
                    path, manifest["dim"], manifest["factory"], ids, self.nprobe, whitening
                )
            except Exception as exc:  # bytes that match an old manifest without sizes, yet do not load
                raise StoreDamaged(f"{base}/index.faiss", f"unreadable ({type(exc).__name__})") from None
        self.index = index
        self.table = self._snapshot_table(manifest)
        self.tombstones = set(dead.tolist())
        self.sequence = self.snapshot_watermark = int(manifest["watermark"])
        log.info("loaded snapshot %s: %d vectors at sequence %d", base, len(self.index), self.sequence)

    def _whitening(self, manifest: dict[str, Any]) -> Whitening | None:
        """The snapshot's whitening (checked against its manifest like every snapshot file), or None:
        a snapshot without one (no whitening asked, or too few vectors yet) is searched as it is."""
        if not manifest.get("whitening"):
            return None
        name = manifest["whitening"].get("file", C.SNAPSHOT_WHITENING)
        data = integrity.snapshot_file(self.store, manifest, name)
        try:
            whitening = Whitening.from_bytes(data)
        except ValueError as exc:
            raise StoreDamaged(f"{manifest['path']}/{name}", str(exc)) from None
        if whitening.dim != int(manifest["dim"]):
            reason = f"{whitening.dim}-d, the snapshot {manifest['dim']}-d"
            raise StoreDamaged(f"{manifest['path']}/{name}", reason)
        return whitening

    def _snapshot_table(self, manifest: dict[str, Any]) -> AttributeTable:
        """The filterable values of a snapshot's rows: its rows file; a snapshot written before
        there was one gives them from its vector files (read once more, vectors and all)."""
        table = AttributeTable()
        if ROWS_FILE in manifest["files"]:
            ids, values = read_snapshot_rows(integrity.snapshot_file(self.store, manifest, ROWS_FILE))
            table.add(ids, values)
            return table
        checks = manifest.get("vector_sha256", {})
        for key in manifest["vector_files"]:
            ids, _, rows = decode_segment_rows(integrity.read_checked(self.store, key, checks.get(key)))
            if rows.says_anything():
                table.add(ids, rows.filterable())
        return table

    def _own(self, ids: np.ndarray) -> np.ndarray:
        if self.shard is None:
            return np.ones(len(ids), dtype=bool)
        k, n = self.shard
        return np.asarray(ids) % n == k

    def _load_shard(self, manifest: dict[str, Any]) -> None:
        """A shard keeps only its ids: it streams the snapshot's vector files instead of its index."""
        dead = np.frombuffer(integrity.snapshot_file(self.store, manifest, "tombstones.npy"), np.int64)
        ids_parts, vector_parts = [], []
        checks = manifest.get("vector_sha256", {})
        table = AttributeTable()
        for key in manifest["vector_files"]:
            ids, vectors, rows = decode_segment_rows(integrity.read_checked(self.store, key, checks.get(key)))
            keep = self._own(ids) & ~np.isin(ids, dead)
            ids_parts.append(ids[keep])
            vector_parts.append(vectors[keep])
            if rows.says_anything():
                table.add(ids[keep], rows.take(keep).filterable())
        self.table = table
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        vectors = np.concatenate(vector_parts) if vector_parts else np.zeros((0, manifest["dim"]), np.float32)
        factory = manifest["factory"] if len(ids) >= 39 * 16 else "Flat"
        whitening = self._whitening(manifest)  # the whole collection's: every shard whitens alike
        self.index = VectorIndex(manifest["dim"], factory, nprobe=self.nprobe, whitening=whitening)
        if not self.index.is_trained:
            self.index.train(vectors[:: max(1, len(vectors) // 200_000)])
        self.index.add(ids, vectors)
        self.tombstones = set(dead.tolist())
        self.sequence = self.snapshot_watermark = int(manifest["watermark"])
        log.info("shard %s loaded %d vectors at sequence %d", self.shard, len(self.index), self.sequence)

    def refresh(self, force: bool = False) -> int:
        """Apply every commit newer than what is loaded; returns how many were applied."""
        with self._lock:
            if self._unloaded:  # never serve the empty state a failed reload left: load, or raise
                self._reset()
                self._unloaded, force = False, True
            changes, epoch = self.coord.change_state()
            if not force and changes == self._seen_changes and epoch == self._epoch:
                return 0
            # Deleted or restored meanwhile (fewer changes), or its log rebuilt from the store (a new
            # epoch: the same sequence numbers may now name other commits): start from the snapshot.
            if changes < self._seen_changes or (self._seen_changes >= 0 and epoch != self._epoch):
                log.info("collection %s was reset; reloading", self.layout.collection)
                self._reset()
            applied = 0
            commits = self.coord.commits_after(self.sequence)
            expected = integrity.checksums(self.coord, [key for _, key in commits])
            replaced = self.coord.replaced([key for _, key in commits if f"/{C.STORE_SEGMENTS}/" in key])
            for sequence, key in commits:
                try:
                    self._apply(key, expected[key], replaced.get(key, []))
                except ObjectNotFound:
                    if self.coord.snapshot_watermark() < sequence:
                        # No snapshot holds it: reloading would meet the same hole again, forever.
                        self._skip(key, "missing")
                    else:
                        # Garbage-collected after a newer snapshot took it in: start from that snapshot.
                        log.warning("%s is gone; reloading from the newest snapshot", key)
                        self._reset()
                        return self.refresh(force=True)
                self.sequence = sequence
                applied += 1
            self._seen_changes, self._epoch = changes, epoch
        self._maybe_swap()
        return applied

    def _reset(self) -> None:
        self.index, self.sequence, self.snapshot_watermark, self.tombstones = None, 0, 0, set()
        self.table = AttributeTable()
        self.damaged, self.skipped = {}, {}
        self._load_snapshot()

    def _skip(self, key: str, reason: str) -> None:
        """Leave a damaged segment out, loudly: searches go on without its vectors, marked degraded."""
        self.skipped[key] = reason
        self._damage(key, reason)

    def _apply(self, key: str, sha: str | None = None, replaced: list[int] | None = None) -> None:
        """One commit. ``replaced``: the ids its keyed rows took the keys of; they go in the same step
        (under the searcher's lock), so no search sees both images of a key, or neither."""
        kind = key.split("/")[-2]
        data = self.store.get(key)
        reason = integrity.problem(data, sha)
        if kind == C.STORE_TOMBSTONES:
            try:
                image_id = int(json.loads(data)["id"]) if reason is None else None
            except (ValueError, KeyError, TypeError):
                image_id, reason = None, "not a tombstone"
            if image_id is None:
                # The key names the id (tombstones/<id>.json): the removal still wins.
                self._damage(key, f"{reason}; applied by the id in its name")
                image_id = int(key.rsplit("/", 1)[-1].split(".")[0])
            self.tombstones.add(image_id)
            self.table.remove([image_id])
            if self.index is not None:
                self.index.remove([image_id])
        elif kind == C.STORE_SEGMENTS:
            if reason is None:
                try:
                    ids, vectors, rows = decode_segment_rows(data)
                    dim = vectors.shape[1] if vectors.ndim == 2 else 0
                    want = dim if self.index is None else self.index.dim
                    if len(ids) != len(vectors) or dim < 1 or dim != want:
                        reason = f"{len(ids)} ids, vectors of shape {vectors.shape}"
                except Exception as exc:  # noqa: BLE001 - any decode failure is damage
                    reason = f"unreadable ({type(exc).__name__})"
            if reason is None:
                keep = np.array([int(i) not in self.tombstones for i in ids], dtype=bool) & self._own(ids)
                if self.index is None:
                    self.index = VectorIndex(int(vectors.shape[1]), nprobe=self.nprobe)
                self.index.add(ids[keep], vectors[keep])
                if rows.says_anything():  # a segment from before keys and attributes has nothing to filter
                    self.table.add(ids[keep], rows.take(keep).filterable())
            else:
                self._skip(key, reason)
            if replaced:  # a damaged segment still took its keys over: the old images go all the same
                self.tombstones.update(replaced)
                self.table.remove(replaced)
                if self.index is not None:
                    self.index.remove(replaced)
        else:
            raise ValueError(f"unknown commit object {key}")

    def health(self) -> dict[str, Any]:
        """Nothing when all is well; else ``degraded`` (vectors left out) and what was found damaged."""
        if not self.damaged:
            return {}
        return {
            "degraded": bool(self.skipped),
            "damaged": [{"key": k, "reason": r} for k, r in sorted(self.damaged.items())],
        }

    def memory_bytes(self) -> int:
        """What this searcher holds: its index, plus a newer snapshot while one loads beside it."""
        index = self.index
        return (0 if index is None else index.memory_bytes()) + self.table.nbytes() + self._incoming

    def _snapshot_bytes(self) -> int:
        """About what the published snapshot takes once loaded (this searcher's share of it)."""
        manifest = None
        with contextlib.suppress(ValueError, KeyError, TypeError):  # unreadable: estimated as below
            manifest = read_pointer(self.store, self.layout)
        if manifest is None or "count" not in manifest:
            return self.memory_bytes()  # the live state holds about what a snapshot of it holds
        share = self.shard[1] if self.shard else 1
        return index_bytes(
            int(manifest["count"]) // share + 1,
            str(manifest.get("factory", "Flat")),
            int(manifest["dim"]),
            int(manifest.get("id_bits", 0)),
        )

    def _maybe_swap(self) -> None:
        """Take in a newer snapshot (written by compaction), in a background thread."""
        published = self.coord.snapshot_watermark()
        if published <= max(self.snapshot_watermark, self.published_seen) or self._swapping:
            return
        self._swapping = True
        threading.Thread(
            target=self._swap, args=(published,), name="pupyl-snapshot-swap", daemon=True
        ).start()

    def _swap(self, published: int) -> None:
        """Load the newer snapshot beside the live state and swap it in, searches going on meanwhile,
        when both indexes fit the memory budget; else reload in place: the live index is dropped
        first and searches wait for the load. A hot swap used to hold two indexes whatever
        PUPYL_SEARCH_MEMORY_GB said (20 GB for a 10 GB collection)."""
        try:
            need = self._snapshot_bytes()
            if self.room is not None and self.index is not None and not self.room(need):
                log.warning(
                    "collection %s: no room for a second index (%d MiB) within PUPYL_SEARCH_MEMORY_GB; "
                    "reloading in place (searches wait for it)",
                    self.layout.collection,
                    need >> 20,
                )
                with self._lock:
                    self._unloaded = True
                    self.refresh(force=True)
                return
            self._incoming = need  # counted in the budget while it loads
            fresh = Searcher(self.store, self.coord, self.layout, self.nprobe, self.shard, self.scratch)
            fresh.load()
            for attempt in range(10):
                if attempt < 9:
                    fresh.refresh(force=True)  # catch up outside our lock: searches go on meanwhile
                with self._lock:
                    if attempt == 9:
                        fresh.refresh(force=True)
                    if fresh.sequence >= self.sequence:
                        self.index, self.sequence, self.table = fresh.index, fresh.sequence, fresh.table
                        self.tombstones, self.snapshot_watermark = fresh.tombstones, fresh.snapshot_watermark
                        self.published_seen = max(self.published_seen, fresh.published_seen)
                        self.damaged, self.skipped = fresh.damaged, fresh.skipped
                        break
            log.info("swapped in snapshot at sequence %d", self.snapshot_watermark)
        except Exception:
            log.exception("could not load the newer snapshot; keeping the live index")
            self.published_seen = published  # do not retry in a loop
        finally:
            self._incoming = 0
            self._swapping = False

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
        return self.search_many(vector[None, :], top)[0]

    def search_many(
        self, vectors: np.ndarray, top: int, where: Filter | None = None, raw_distances: bool = False
    ) -> list[list[tuple[int, float]]]:
        """Each vector's ``top`` nearest; with ``where`` (attributes.parse_filter), the true top
        among the images the filter allows (their ids from the attribute table, then an exact
        filtered search: vector_index.VectorIndex.search_within). ``raw_distances`` (unfiltered
        only): in a whitened index, the whitened nearest re-scored by raw cosine (VectorIndex.search)."""
        self.refresh()
        with self._lock:
            if self.index is None:
                return [[] for _ in range(len(vectors))]
            if where is not None:
                return self.index.search_within(vectors, top, self.table.select(where))
            return self.index.search(vectors, top, raw_distances=raw_distances)

    def vector(self, image_id: int) -> np.ndarray:
        self.refresh()
        with self._lock:
            if self.index is None or image_id not in self.index:
                raise KeyError(f"no image with id {image_id} in collection {self.layout.collection!r}")
            return self.index.vector(image_id)

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)
