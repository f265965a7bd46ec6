"""Rebuild a collection's Redis state from the store, after Redis lost it (flushed, or a new empty one).

The store holds everything that matters; Redis holds what makes it fast and safe to change: the
id counter, the commit log (which segments and tombstones come after the newest snapshot), the
dedup map, counts, checksums of committed objects and the job records. All of it can be derived:

- the newest whole snapshot gives the watermark; the ids in its vector files and its tombstones say
  which segments and tombstones it already holds;
- every other segment (ordered by its ids, which only grow) and then every other tombstone is
  published again after the watermark, so sequences stay contiguous, and its checksum is
  recorded from the bytes in the store now (the store is trusted at rebuild time);
- the id counter goes past every id seen anywhere (images, segments, snapshot, tombstones), so no
  id is ever reused; the dedup map and the image count come from the image metadata (the batch
  objects, less every removed id, and the per-image objects of collections written before them);
- the metadata range index (which batch object holds an id) and the removed ids come from the
  batch objects, the tombstones and the snapshots' removed lists: only the removed ids that some
  batch object still holds (a compaction's prune took the others out; pupyl_queue/metadata.py);
- the key map (caller's key -> live id) comes from the rows the snapshot's vector files and the
  segments carry, minus every removed id (a replaced id has its tombstone too: pupyl_queue/keys.py);
- job records come back from the per-batch reports. A job that was running when Redis went lost
  its queued messages with it: its staged and uploaded bytes are still in the store, so it is
  marked failed ("interrupted") and those bytes are deleted; index its source again with
  check_unique to finish it (what was indexed is skipped).

A new epoch tells every search worker that the log was rewritten: each reloads from the snapshot.
Rebuilding over live state would fork it, so it refuses unless Redis has nothing of the collection.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity, keys
from pupyl_queue.codecs import decode_segment, read_manifest
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import StoreDamaged
from pupyl_queue.jobs import batch_id
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import rebuild_index
from pupyl_queue.store import ObjectStore

log = logging.getLogger(__name__)


class RebuildError(RuntimeError):
    pass


def rebuild(store: ObjectStore, client: redis.Redis, name: str, force: bool = False) -> dict[str, Any]:
    """Rebuild one collection's Redis state from its store objects; returns what was restored."""
    layout = Layout(name)
    coord = Coordinator(client, layout)
    manifest = read_manifest(store, layout)
    if manifest is None:
        raise RebuildError(f"no collection {name!r} in the store")
    if coord.last_sequence() and not force:
        raise RebuildError(
            f"Redis still holds collection {name!r} (sequence {coord.last_sequence()}): rebuilding over "
            "live state would fork it; use --force only when you know that state is wrong"
        )
    if force:
        _forget(client, layout)
    snapshots = _whole_snapshots(store, coord)
    watermark = int(snapshots[0]["watermark"]) if snapshots else 0
    segments, max_id = _segments(store, layout)
    tombstones = sorted(
        (int(key.rsplit("/", 1)[-1].split(".")[0]), key)
        for key in store.list(f"{layout.root}/{C.STORE_TOMBSTONES}/")
    )
    contents = [_snapshot_contents(store, snapshot) for snapshot in snapshots]
    after_newest = _after(segments, tombstones, contents[0] if contents else None)
    start, before_newest = _replayable(segments, tombstones, snapshots, contents, after_newest)
    removed = {i for i, _ in tombstones}.union(*(dead for _, dead in contents))
    images = rebuild_index(store, client, layout, removed)  # also the metadata ranges and removed ids
    seen = [max_id, *images.values(), *(i for i, _ in tombstones)]
    seen += [max(held | dead, default=0) for held, dead in contents]

    client.set(layout.key("model"), json.dumps(manifest["model"], sort_keys=True))
    client.set(layout.key(C.KEY_ID_COUNTER), max(seen, default=0))
    client.set(layout.key(C.KEY_SEQUENCE), start)
    coord.set_snapshot_watermark(watermark)
    for key in before_newest + after_newest:
        coord.publish(key, checksum=integrity.sha256(store.get(key)))
    client.set(layout.key(C.KEY_COUNT), len(images))
    if images:
        client.hset(layout.key(C.KEY_HASHES), mapping={sha: str(i) for sha, i in images.items()})
    key_map = keys.restore_key_map(store, coord)  # from the rows the segments and snapshot carry
    jobs = _jobs(store, client, coord)
    client.set(layout.key(C.KEY_EPOCH), f"rebuilt-{time.time():.6f}")
    result = {
        "collection": name,
        "snapshot_watermark": watermark,
        "sequence": coord.last_sequence(),
        "log_from": start,
        "commits_after_snapshot": len(after_newest),
        "images": len(images),
        "next_id": max(seen, default=0) + 1,
        **key_map,
        **jobs,
    }
    log.info("rebuilt %s: %s", name, result)
    return result


def _forget(client: redis.Redis, layout: Layout) -> None:
    keys = list(client.scan_iter(f"{layout.key('')}*"))
    if keys:
        client.delete(*keys)


def _whole_snapshots(store: ObjectStore, coord: Coordinator) -> list[dict[str, Any]]:
    """Published snapshots whose manifest and files are whole, newest first (damaged ones passed over)."""
    candidates, _ = integrity.snapshot_candidates(store, coord)
    whole = []
    for path in candidates:
        try:
            manifest = integrity.open_manifest(store, path)
            for name in manifest["files"]:
                integrity.snapshot_file(store, manifest, name)
            whole.append(manifest)
        except StoreDamaged as exc:
            log.error("rebuild passes over snapshot %s: %s", path, exc)
    return whole


def _snapshot_contents(store: ObjectStore, manifest: dict[str, Any]) -> tuple[set[int], set[int]]:
    """Ids whose vectors the snapshot holds, and ids it holds as removed."""
    held: set[int] = set()
    checks = manifest.get("vector_sha256", {})
    for key in manifest["vector_files"]:
        ids, _ = decode_segment(integrity.read_checked(store, key, checks.get(key)))
        held.update(ids.tolist())
    dead = np.frombuffer(integrity.snapshot_file(store, manifest, "tombstones.npy"), np.int64)
    return held, set(dead.tolist())


Segment = tuple[str, int, set[int], str]  # batch id, first id, ids, store key
Contents = tuple[set[int], set[int]]


def _after(
    segments: list[Segment], tombstones: list[tuple[int, str]], snapshot: Contents | None
) -> list[str]:
    """The commits a snapshot does not hold, in an order that replays right: segments by their ids
    (ids only grow), then tombstones (an id is never reused, so a removal after every insert is
    the same removal)."""
    held, dead = snapshot or (set(), set())
    return [key for _, _, ids, key in segments if not ids & (held | dead)] + [
        key for image_id, key in tombstones if image_id not in dead
    ]


def _replayable(
    segments: list[Segment],
    tombstones: list[tuple[int, str]],
    snapshots: list[dict[str, Any]],
    contents: list[Contents],
    after_newest: list[str],
) -> tuple[int, list[str]]:
    """Where the rebuilt log starts, and the commits before the newest watermark it holds again.

    Readers fall back to an older snapshot (or a full replay) only when the log is complete after
    its watermark, so the log goes back as far as the store still holds every commit: from 0 when
    nothing was garbage-collected, else from the oldest snapshot whose later commits all remain.
    """
    if not snapshots:
        return 0, []
    newest = int(snapshots[0]["watermark"])
    bases = [(0, None)] + [
        (int(m["watermark"]), c) for m, c in reversed(list(zip(snapshots[1:], contents[1:])))
    ]
    later = set(after_newest)
    for base, held in bases:
        between = [key for key in _after(segments, tombstones, held) if key not in later]
        if len(between) == newest - base:
            return base, between
    return newest, []


def _segments(store: ObjectStore, layout: Layout) -> tuple[list[Segment], int]:
    """Every segment in the store with its ids, oldest ids first; and the largest id in any."""
    found: list[Segment] = []
    max_id = 0
    for key in store.list(f"{layout.root}/{C.STORE_SEGMENTS}/"):
        try:
            ids = decode_segment(store.get(key))[0].tolist()
        except Exception as exc:  # noqa: BLE001 - reported; the searchers' checks handle it
            log.error("rebuild cannot read segment %s (%s); it is published as it is", key, exc)
            ids = []
        max_id = max([max_id, *ids])
        batch_id = key.rsplit("/", 1)[-1].removesuffix(".npz")
        found.append((batch_id, min(ids, default=0), set(ids), key))
    found.sort(key=lambda row: (row[1], row[3]))
    return found, max_id


def _jobs(store: ObjectStore, client: redis.Redis, coord: Coordinator) -> dict[str, int]:
    """Job records from the per-batch reports; jobs cut off by the loss are marked interrupted."""
    layout = coord.layout
    reports: dict[str, list[str]] = defaultdict(list)
    for key in store.list(f"{layout.root}/{C.STORE_JOBS}/"):
        reports[key.split("/")[-2]].append(key)
    leftovers = {
        job_id
        for prefix in (C.STORE_STAGING, C.STORE_UPLOADS)
        for job_id in store.children(f"{layout.root}/{prefix}")
    }
    interrupted = 0
    for job_id in sorted(set(reports) | leftovers):
        if client.exists(layout.job_key(job_id)):
            continue  # another collection's rebuild, or a job started since the loss, has it
        totals = {"indexed": 0, "duplicate": 0, "failed": 0, "total": 0}
        batches = {}
        for key in reports.get(job_id, []):
            report = json.loads(store.get(key))
            for field in ("indexed", "duplicate", "failed"):
                totals[field] += int(report.get(field) or 0)
            totals["total"] += len(report.get("items", []))
            summary = {k: v for k, v in report.items() if k != "items"}
            batches[str(report["batch"])] = json.dumps(summary)
            # The ids a batch owns start at (an item's id - its place): a rerun then gets the same ids.
            for place, item in enumerate(report.get("items", [])):
                if item.get("status") == "indexed":
                    owner = batch_id(job_id, report["batch"])
                    client.hset(layout.key(C.KEY_BATCH_IDS), owner, int(item["id"]) - place)
                    break
        fields: dict[str, Any] = {
            "collection": layout.collection,
            "uri": "(rebuilt from the store)",
            "batches_total": len(batches),
            "batches_done": len(batches),
            "expanded": 1,
            "rebuilt_at": time.time(),
            **totals,
        }
        if job_id in leftovers:
            interrupted += 1
            fields.update(
                state="failed",
                error="interrupted: Redis lost this running job's queued work; index its source again "
                "with check_unique to finish it (what was indexed is skipped)",
            )
            store.delete_prefix(layout.staging(job_id) + "/")
            store.delete_prefix(layout.uploads(job_id) + "/")
        else:
            fields.update(state="done", finished_at=time.time())
        coord.create_job(job_id, fields)
        if batches:
            client.hset(layout.job_key(job_id) + ":batches", mapping=batches)
    return {"jobs": len(set(reports) | leftovers), "jobs_interrupted": interrupted}
