"""Callers' keys after the commit: retiring the ids a key no longer names, and the key map from the store.

The commit itself (coordination.Coordinator.commit) decides, in one Lua script, which id each key
names and which ids its segment tombstones; readers apply both together. This module does what
follows, and what rebuilds:

- ``retire``: for each id a commit replaced, a tombstone object in the store (the store is the
  truth: after Redis is lost, ``rebuild`` finds the replacement there), committed like a removal,
  the old image's files deleted and its metadata marked removed. Idempotent: a redelivered batch
  gets the same replaced ids from the commit and retires them again harmlessly.
- ``derive``: the key map from the store alone (a snapshot's vector files and the committed
  segments carry each row's key), for ``rebuild`` and ``restore``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.codecs import decode_segment_rows, read_pointer
from pupyl_queue.coordination import Coordinator
from pupyl_queue.metadata import mark_removed
from pupyl_queue.store import ObjectNotFound, ObjectStore
from pupyl_queue.write_claim import write_once

log = logging.getLogger(__name__)


def retire(
    store: ObjectStore, coord: Coordinator, replaced: list[tuple[int, str]], by: dict[str, int]
) -> None:
    """Make each replaced id's removal durable in the store and delete its image files.

    ``by``: key -> the id that replaced it (recorded in the tombstone, for people reading the store).
    The replacing commit already took the id out of the count and the dedup map: the tombstone is
    committed with no count change.
    """
    layout = coord.layout
    for old_id, key in replaced:
        tombstone = layout.tombstone(old_id)
        record = {"id": old_id, "removed_at": time.time(), "key": key, "replaced_by": by.get(key)}
        commit_tombstone(store, coord, tombstone, record)
        mark_removed(coord.r, layout, [old_id])  # its entry in its batch's metadata object reads as gone
        for path in (
            layout.image(old_id),
            layout.original(old_id),
            layout.image_meta(old_id),
            layout.local_features(old_id),
        ):
            store.delete(path)


def commit_tombstone(
    store: ObjectStore,
    coord: Coordinator,
    tombstone: str,
    record: dict[str, object],
    images: int = 0,
    removes: int | None = None,
) -> int:
    """Write a tombstone (unless an earlier run did: its bytes stand) and commit it, once; its sequence.

    Two live runs retire or remove the same id at the same moment (both runs of a keyed batch, the
    one that waited for the other's commit going on at once): only the one holding the claim writes
    (write_claim.py). ``images`` and ``removes`` go to the commit (Coordinator.publish).
    """

    def write() -> str:
        if not store.exists(tombstone):
            store.put(tombstone, json.dumps(record).encode())
        return integrity.sha256(store.get(tombstone))

    def publish(checksum: str | None, writer: str | None) -> int:
        return coord.publish(tombstone, images=images, removes=removes, checksum=checksum, writer=writer)

    return write_once(coord, tombstone, write, publish)


@dataclass
class KeyMap:
    """key -> (id, sequence, sha256) of the live row of each key, and what could not be decided."""

    entries: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    conflicts: int = 0  # keys found live on two ids (a replacement cut off before its tombstone)


def derive(store: ObjectStore, coord: Coordinator) -> KeyMap:
    """The key map implied by the published snapshot and the commit log as Redis holds them now.

    Rows in log order (the snapshot's first, at its watermark), minus every id a tombstone or the
    snapshot removed. A key live on two ids can only come from a replacement whose tombstone never
    reached the store (its worker died between commit and tombstone, and then Redis was lost): the
    later row in log order keeps the key and the conflict is counted; both images stay searchable.
    """
    rows: list[tuple[int, int, str | None, str | None]] = []  # (sequence, id, key, sha)
    dead: set[int] = set()
    manifest = read_pointer(store, coord.layout)
    if manifest is not None:
        watermark = int(manifest["watermark"])
        checks = manifest.get("vector_sha256", {})
        for file in manifest["vector_files"]:
            ids, _, found = decode_segment_rows(integrity.read_checked(store, file, checks.get(file)))
            rows += [(watermark, int(i), k, s) for i, k, s in zip(ids.tolist(), found.keys, found.sha256)]
        since = watermark
    else:
        since = 0
    for sequence, key in coord.commits_after(since):
        kind = key.split("/")[-2]
        try:
            data = store.get(key)
        except ObjectNotFound:
            log.error("key map: committed %s is missing; its rows are left out", key)
            continue
        if kind == C.STORE_TOMBSTONES:
            dead.add(int(key.rsplit("/", 1)[-1].split(".")[0]))
        elif kind == C.STORE_SEGMENTS:
            try:
                ids, _, found = decode_segment_rows(data)
            except Exception as exc:  # noqa: BLE001 - reported; the searchers' checks handle it
                log.error("key map: cannot read %s (%s); its rows are left out", key, exc)
                continue
            rows += [(sequence, int(i), k, s) for i, k, s in zip(ids.tolist(), found.keys, found.sha256)]
    out = KeyMap()
    for sequence, image_id, key, sha in rows:
        if key is None or image_id in dead:
            continue
        if key in out.entries and out.entries[key][0] != image_id:
            out.conflicts += 1
            log.warning(
                "key %r is live on ids %d and %d; the later keeps it", key, out.entries[key][0], image_id
            )
        out.entries[key] = (image_id, sequence, sha or "")
    return out


def restore_key_map(store: ObjectStore, coord: Coordinator) -> dict[str, int]:
    """Derive the key map from the store and write it to Redis; counts for the caller's report."""
    found = derive(store, coord)
    coord.set_keys(found.entries)
    return {"keys": len(found.entries), "key_conflicts": found.conflicts}
