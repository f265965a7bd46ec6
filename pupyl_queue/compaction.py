"""Compaction: a new snapshot version of a collection, built off the search path.

Runs on a maintenance worker, one at a time per collection (a Redis lock),
never inside a search worker, so searches are not blocked. It streams the live
vectors (the previous snapshot's merged vector files, then every later
segment), drops tombstoned ids, picks the index type for the live count,
trains it on a sample, adds everything, and writes: the index, its id bitmap,
the tombstones, the vector files for the next compaction, and a manifest
with checksums; then it publishes the pointer. Then it garbage-collects what
the snapshot before this one still needed (segments, vector files, snapshot), and
last prunes the metadata of the ids the published snapshot holds as removed out of
the batch objects and Redis's ``removed`` set (pupyl_queue/metadata.py ``prune``).

Vector files: an input file of at least REUSE_ROWS vectors, none of them
removed, is referenced as it is (a big segment, or a vector file of the
previous snapshot); only small or partly removed files are merged into new
ones. Copying every live vector at every compaction doubled the store's size
at its peak (40 GB more at 10M 1024-d vectors) and rewrote what had not changed.

Whitening: a collection created with it (``PUPYL_WHITENING=pca``, its model's ``whitening``)
gets its PCA whitening learned here, at every compaction, from an even sample of the live
vectors once there are enough (whitening.minimum_vectors); the index is trained and filled
with whitened vectors, and the transform is written into the snapshot (``whitening.npz``, in
the manifest's files and checksums, described under ``whitening``). Stored vectors (segments,
vector files) stay the network's own, so the next compaction learns again from them.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pupyl_queue import constants as C
from pupyl_queue import integrity, metadata
from pupyl_queue.codecs import (
    ROWS_FILE,
    SegmentRows,
    decode_segment_rows,
    encode_segment,
    encode_snapshot_rows,
)
from pupyl_queue.coordination import Coordinator
from pupyl_queue.fencing import Fence, FencedOut, publish_pointer
from pupyl_queue.integrity import StoreDamaged
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound, ObjectStore
from pupyl_queue.vector_index import VectorIndex, choose_factory
from pupyl_queue.whitening import Whitening, learn, minimum_vectors, strength_of

log = logging.getLogger(__name__)
MERGED_ROWS = 200_000  # vectors per merged vector file
REUSE_ROWS = 10_000  # an input file this big with no removed vector is referenced, not copied
TRAIN_PER_LIST = 64


class Compactor:
    def __init__(
        self, store: ObjectStore, coord: Coordinator, settings: Settings, fence: Fence | None = None
    ) -> None:
        self.store = store
        self.fence = fence or Fence()  # the lock's fencing token: checked before every write (fencing.py)
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
        # Ids a segment's keyed rows took the keys of: tombstoned by that segment's commit.
        for ids in self.coord.replaced(
            [k for _, k in commits if k.split("/")[-2] == C.STORE_SEGMENTS]
        ).values():
            tombstones.update(ids)
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

    def _chunks(
        self, files: list[str], tombstones: set[int]
    ) -> Iterator[tuple[str, np.ndarray, np.ndarray, bool, SegmentRows]]:
        """(key, live ids, their vectors, whether the file is referenced as it is, their rows), file by file.

        The rows (each one's key, sha256, attributes) go into the merged vector files with their
        vectors, so the key map can be derived from a snapshot after its segments were collected.
        """
        dead = np.fromiter(tombstones, dtype=np.int64, count=len(tombstones))
        for key in files:
            try:
                # Never bake damaged bytes into a snapshot: GC would then delete the only evidence.
                data = integrity.read_checked(self.store, key, self._checks.get(key))
                try:
                    ids, vectors, rows = decode_segment_rows(data)
                except Exception as exc:  # noqa: BLE001 - any decode failure is damage
                    raise StoreDamaged(key, f"unreadable ({type(exc).__name__})") from None
            except StoreDamaged as exc:
                integrity.report(self.coord, exc.key, exc.reason, by="compaction")
                raise
            live = ~np.isin(ids, dead)
            reusable = bool(live.all()) and len(ids) >= REUSE_ROWS
            if reusable and key not in self._checks:
                self._checks[key] = integrity.sha256(data)  # referenced as it is: its manifest needs one
            yield key, ids[live], vectors[live], reusable, rows.take(live)

    def run(self, model: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        previous = self._base()
        watermark = self.coord.last_sequence()
        if previous and previous["watermark"] >= watermark:
            pruned = self._prune_metadata(lambda: _removed_in(self.store, previous))  # a cut-off prune's rest
            return {**previous, "skipped": "nothing committed since the last snapshot", **pruned}
        files, tombstones = self._inputs(previous, watermark)
        count, dim = 0, 0
        for _, ids, vectors, _, _ in self._chunks(files, tombstones):
            count += len(ids)
            dim = dim or (vectors.shape[1] if vectors.size else 0)
        dim = dim or int(model.get("dim", 0))
        s = self.settings
        factory = s.index_factory or choose_factory(
            count, dim, int(s.index_memory_gb * 1024**3), s.flat_below
        )
        whitening, pending = self._learn_whitening(model, files, tombstones, count, dim)
        index = VectorIndex(dim, factory, nprobe=s.index_nprobe, whitening=whitening)
        if not index.is_trained:
            index.train(self._sample(files, tombstones, factory, count))
        base = self.layout.snapshot(watermark)
        self.fence.register(base.rsplit("/", 1)[-1])
        merged: list[str] = []
        reused: list[str] = []
        buffer_ids: list[np.ndarray] = []
        buffer_vectors: list[np.ndarray] = []
        buffer_rows = SegmentRows()
        buffered = 0
        table_ids: list[int] = []  # the rows file: each live row's filterable values
        table_values: list[dict[str, Any]] = []
        for key, ids, vectors, reusable, rows in self._chunks(files, tombstones):
            index.add(ids, vectors)
            if rows.says_anything():
                table_ids += ids.tolist()
                table_values += rows.filterable()
            if reusable:
                reused.append(key)
                continue
            buffer_ids.append(ids)
            buffer_vectors.append(vectors)
            buffer_rows.extend(rows)
            buffered += len(ids)
            if buffered >= MERGED_ROWS:
                merged.append(self._write_merged(base, len(merged), buffer_ids, buffer_vectors, buffer_rows))
                buffer_ids, buffer_vectors, buffer_rows, buffered = [], [], SegmentRows(), 0
        if buffered or not (merged or reused):
            merged.append(self._write_merged(base, len(merged), buffer_ids, buffer_vectors, buffer_rows))
        built_s = time.perf_counter() - started
        blobs = {
            "ids.bits": index.ids.to_bytes(),
            "tombstones.npy": np.array(sorted(tombstones), dtype=np.int64).tobytes(),
            ROWS_FILE: encode_snapshot_rows(table_ids, table_values),
        }
        if whitening is not None:
            blobs[C.SNAPSHOT_WHITENING] = whitening.to_bytes()
        files_sha = {name: integrity.sha256(data) for name, data in blobs.items()}
        sizes = {name: len(data) for name, data in blobs.items()}
        for name, data in blobs.items():
            self.fence.check()
            self.store.put(f"{base}/{name}", data)
        files_sha["index.faiss"], sizes["index.faiss"] = self._put_index(f"{base}/index.faiss", index)
        nprobe, count_live, id_bits = index.nprobe, len(index), index.ids.size
        del index  # gigabytes at 10M vectors
        manifest = integrity.seal(
            {
                "schema": C.SCHEMA_VERSION,
                "path": base,
                "model": model,
                "dim": dim,
                "metric": model.get("metric", "cosine"),
                "factory": factory,
                "index_type": factory if factory != "Flat" else "IDMap2,Flat",
                "nprobe": nprobe,
                "memory_budget_gb": s.index_memory_gb,
                "watermark": watermark,
                "count": count_live,
                "tombstones": len(tombstones),
                "id_bits": id_bits,
                "vector_files": reused + merged,
                "files": files_sha,
                "sizes": sizes,
                "vector_sha256": {
                    **{key: self._checks[key] for key in reused},
                    **{key: self._written[key][0] for key in merged},
                },
                "reused_vector_files": len(reused),
                **self._whitening_entry(whitening, pending),
                "build_s": round(built_s, 3),
                "created_at": time.time(),
            }
        )
        # The manifest, then the pointer, last: a reader sees a snapshot only once all of it is written.
        self.fence.check()
        self.store.put(f"{base}/manifest.json", json.dumps(manifest, indent=2).encode())
        publish_pointer(self.store, self.coord.r, self.layout, self.fence, base, watermark)
        # A damaged version at this watermark was just rewritten whole.
        integrity.forget_damage_under(self.coord, base + "/")
        self._collect_garbage()
        log.info("snapshot %s: %d vectors, %s, %.1fs", base, count_live, factory, built_s)
        return {**manifest, **self._prune_metadata(lambda: tombstones)}

    def _prune_metadata(self, gone: Callable[[], set[int]]) -> dict[str, int]:
        """After publishing: the removed ids the snapshot holds leave the batch objects and the
        ``removed`` set (metadata.prune). The snapshot is published whatever happens here; what is
        cut off, the next compaction finishes. ``gone`` is read only when the set holds ids."""
        r = self.coord.r
        removed = r.scard(self.layout.key(C.KEY_REMOVED))
        if not removed and not r.zcard(self.layout.key(C.KEY_META_SUPERSEDED)):
            return {"metadata_pruned": 0}
        try:
            counts = metadata.prune(self.store, r, self.layout, gone() if removed else set(), self.fence)
        except FencedOut as exc:
            log.warning("metadata prune of %s stopped: %s", self.layout.collection, exc)
            return {"metadata_pruned": 0}
        except Exception:  # noqa: BLE001 - the snapshot stands; the next compaction prunes again
            log.exception(
                "metadata prune of %s failed; the next compaction tries again", self.layout.collection
            )
            return {"metadata_pruned": 0}
        if any(counts.values()):
            log.info("metadata of %s pruned: %s", self.layout.collection, counts)
        return {"metadata_pruned": counts["forgotten"]}

    def _learn_whitening(
        self, model: dict[str, Any], files: list[str], tombstones: set[int], count: int, dim: int
    ) -> tuple[Whitening | None, str]:
        """The collection's whitening learned from the live vectors, and why none when it asks for one
        and gets none ("" when it asks for none)."""
        strength = strength_of(str(model.get("whitening") or C.DEFAULT_WHITENING))
        if strength is None:
            return None, ""
        if not dim or count < minimum_vectors(dim):
            return None, f"{count} live vectors, {minimum_vectors(dim)} needed to learn it"
        started = time.perf_counter()
        whitening = learn(self._sample(files, tombstones, "", count, want=C.WHITENING_SAMPLE), strength)
        if whitening is None:
            return None, "the live vectors do not spread in any direction"
        log.info(
            "whitening of %s learned from %d vectors in %.1fs",
            self.layout.collection,
            whitening.learned_from,
            time.perf_counter() - started,
        )
        return whitening, ""

    @staticmethod
    def _whitening_entry(whitening: Whitening | None, pending: str) -> dict[str, Any]:
        """The manifest's ``whitening``: what was learned; null with ``whitening_pending`` (why) when
        the collection asks for one and has too few vectors yet; absent when it asks for none, so a
        collection without the option writes the manifest it always wrote."""
        if whitening is not None:
            return {"whitening": whitening.describe()}
        return {"whitening": None, "whitening_pending": pending} if pending else {}

    def _put_index(self, key: str, index: VectorIndex) -> tuple[str, int]:
        """Write the index through a file (streamed both ways) and return its (sha256, size)."""
        scratch = self.settings.data_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="compaction-") as folder:
            path = Path(folder) / "index.faiss"
            index.write(path)
            self.fence.check()
            self.store.put_file(key, path)
            return integrity.file_sha256(path), path.stat().st_size

    def _sample(
        self, files: list[str], tombstones: set[int], factory: str, count: int, want: int = 0
    ) -> np.ndarray:
        """An even sample of the live vectors, large enough to train ``factory`` (or ``want`` of them)."""
        lists = re.match(r"IVF(\d+)", factory)  # IVF16384 or IVF16384_HNSW32
        nlist = int(lists.group(1)) if lists else 256
        want = min(count, want or max(TRAIN_PER_LIST * nlist, 10_000))
        rng = np.random.default_rng(0)
        parts = []
        for _, _, vectors, _, _ in self._chunks(files, tombstones):
            take = int(round(len(vectors) * want / max(count, 1)))
            if take:
                parts.append(vectors[rng.choice(len(vectors), min(take, len(vectors)), replace=False)])
        return np.concatenate(parts)

    def _write_merged(
        self, base: str, number: int, ids: list[np.ndarray], vectors: list[np.ndarray], rows: SegmentRows
    ) -> str:
        key = f"{self.layout.root}/{C.STORE_VECTORS}/{base.rsplit('/', 1)[-1]}-{number:05d}.npz"
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        data = encode_segment(all_ids, all_vectors, rows if rows.says_anything() else None)
        self.fence.check()
        self.store.put(key, data)
        self._written[key] = (integrity.sha256(data), len(data))
        return key

    def _collect_garbage(self) -> None:
        """Keep the newest PUPYL_SNAPSHOT_KEEP complete snapshots, and every commit the oldest of them needs.

        A searcher that finds the newest snapshot damaged falls back to an older
        one plus the commits after its watermark, so those commits (and their
        segments and tombstones) stay until that snapshot goes. Snapshot folders
        without a manifest and vector files without a snapshot are what a killed
        compaction left behind: never published, they go too. So do the folders of
        runs this one fenced out, manifest or not (never published). The folders of
        a run with a newer token (this run lost its lock meanwhile) are its
        half-written output: they stay, with their vector files (fencing.py).
        """
        self.fence.check()
        folder = f"{self.layout.root}/{C.STORE_SNAPSHOTS}"
        listed = sorted(name for name in self.store.children(folder) if name.isdigit())
        vector_keys = list(self.store.list(f"{self.layout.root}/{C.STORE_VECTORS}/"))
        running = self.fence.newer_runs()  # read after listing: a run registers before its first write
        dead = self.fence.dead_runs() - running
        versions = [name for name in listed if name not in running]
        damaged = {key[len(folder) + 1 :].split("/")[0] for key in integrity.damaged_keys(self.coord)}
        whole = [
            n
            for n in versions
            if n not in damaged and n not in dead and self.store.exists(f"{folder}/{n}/manifest.json")
        ]
        keep = max(1, self.settings.snapshot_keep)
        kept = set(whole[-keep:])
        referenced = {key for name in kept for key in self._vector_files(f"{folder}/{name}")}
        deleted: list[str] = []  # deleted at the end, after the snapshot folders
        gone: list[str] = []
        for name in versions:
            if name not in kept:
                # A segment it referenced outlived its commit (trimmed below): it goes with its last snapshot.
                deleted += [key for key in self._vector_files(f"{folder}/{name}") if key not in referenced]
                gone += list(self.store.list(f"{folder}/{name}/"))
                self.store.delete_prefix(f"{folder}/{name}/")
        for key in vector_keys:
            owner = key.rsplit("/", 1)[-1].split("-", 1)[0]
            if owner not in kept and owner not in running and key not in referenced:
                deleted.append(key)  # also what a killed compaction wrote
        # Until there are PUPYL_SNAPSHOT_KEEP of them, replaying the whole log is the fallback: keep it.
        oldest = int(min(kept)) if len(kept) >= keep else 0
        replay: set[str] = set()  # commits after the oldest kept snapshot: a fallback replays them
        for sequence, key in self.coord.commits_after(0):
            if sequence > oldest:
                replay.add(key)
            elif key not in referenced:  # inside every kept snapshot: no reader needs it any more
                deleted.append(key)
        # A dropped (damaged, say) newer snapshot may list segments the log still needs: never those.
        deleted = [key for key in deleted if key not in replay and key.startswith(self.layout.root + "/")]
        for key in deleted:
            self.store.delete(key)
        if oldest:
            self.coord.trim_commits(oldest)
        integrity.forget(self.coord, gone + deleted)
        self.fence.forget_dead_runs()

    def _vector_files(self, snapshot: str) -> list[str]:
        """The vector files a snapshot folder's manifest lists (none when it has no readable manifest)."""
        try:
            return list(json.loads(self.store.get(f"{snapshot}/manifest.json"))["vector_files"])
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            return []


def _removed_in(store: ObjectStore, manifest: dict[str, Any]) -> set[int]:
    """The ids a snapshot holds as removed."""
    return set(np.frombuffer(integrity.snapshot_file(store, manifest, "tombstones.npy"), np.int64).tolist())
