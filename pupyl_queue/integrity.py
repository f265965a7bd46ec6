"""Checksums of store objects, and the record of damage found in them.

Every object a searcher or a compaction reads is checked before it is used:

- snapshot files against the sha256 and size in their manifest, and the manifest
  against its own ``checksum`` (sha256 of its canonical JSON without that field);
- committed segments and tombstones against the sha256 recorded in Redis when
  they were committed (``pupyl:<collection>:checksums``, store key -> sha256).

Damage is logged as an error naming the object and the reason, and recorded in
``pupyl:<collection>:damaged`` (store key -> JSON ``{"reason", "seen_at", "by"}``),
which ``describe`` shows. An entry goes when its object is rewritten by a
compaction or garbage-collected; an operator who repairs an object by hand
deletes its field. What the readers do about damage is in searcher.py and
compaction.py: fall back to an older snapshot, skip a damaged segment loudly,
never serve or bake in bytes that do not match their checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

KEY_CHECKSUMS = C.KEY_CHECKSUMS  # HASH store key -> sha256 (the commit records it: coordination.py)
KEY_DAMAGED = "damaged"  # HASH store key -> JSON {"reason", "seen_at", "by"}
MANIFEST = "manifest.json"


class StoreDamaged(ValueError):
    """An object's bytes are missing, unreadable or do not match their checksum."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _mismatch(length: int, digest: Callable[[], str], sha: str | None, size: int | None) -> str | None:
    """Size first (cheap), then the sha256, computed only when there is one to compare with."""
    if size is not None and length != size:
        word = "truncated" if length < size else "too long"
        return f"{word}: {length} bytes, {size} expected"
    if sha is not None and digest() != sha:
        return "sha256 mismatch (the bytes were altered)"
    return None


def file_problem(path: str | Path, sha: str | None, size: int | None = None) -> str | None:
    """``problem`` for a file, read in chunks: a snapshot index may not fit in memory twice."""
    return _mismatch(os.path.getsize(path), lambda: file_sha256(path), sha, size)


def problem(data: bytes, sha: str | None, size: int | None = None) -> str | None:
    """Why ``data`` is not the object its checksum describes, or None when it is (or nothing is known)."""
    return _mismatch(len(data), lambda: sha256(data), sha, size)


def read_checked(store: ObjectStore, key: str, sha: str | None, size: int | None = None) -> bytes:
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise StoreDamaged(key, "missing") from None
    reason = problem(data, sha, size)
    if reason:
        raise StoreDamaged(key, reason)
    return data


# --- manifests
def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own checksum, so an altered manifest is detected like an altered file."""
    return {**manifest, "checksum": sha256(_canonical(manifest))}


def open_manifest(store: ObjectStore, base: str) -> dict[str, Any]:
    """A snapshot's manifest, checked; manifests written before checksums existed are taken as they are."""
    key = f"{base}/{MANIFEST}"
    try:
        manifest = json.loads(store.get(key))
    except ObjectNotFound:
        raise StoreDamaged(key, "missing (the snapshot was never completed or was deleted)") from None
    except ValueError as exc:
        raise StoreDamaged(key, f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict) or not {"watermark", "files", "path", "dim"} <= manifest.keys():
        raise StoreDamaged(key, "not a snapshot manifest")
    if "checksum" in manifest and sha256(_canonical(manifest)) != manifest["checksum"]:
        raise StoreDamaged(key, "checksum mismatch (the manifest was altered)")
    if manifest["path"] != base:
        raise StoreDamaged(key, f"names another snapshot ({manifest['path']})")
    return manifest


def snapshot_file(store: ObjectStore, manifest: dict[str, Any], name: str) -> bytes:
    sizes = manifest.get("sizes", {})
    return read_checked(store, f"{manifest['path']}/{name}", manifest["files"][name], sizes.get(name))


def snapshot_file_to(store: ObjectStore, manifest: dict[str, Any], name: str, path: str | Path) -> None:
    """``snapshot_file`` into a file at ``path``, checked there, never whole in memory."""
    key = f"{manifest['path']}/{name}"
    try:
        store.get_file(key, path)
    except ObjectNotFound:
        raise StoreDamaged(key, "missing") from None
    reason = file_problem(path, manifest["files"][name], manifest.get("sizes", {}).get(name))
    if reason:
        raise StoreDamaged(key, reason)


# --- which snapshots a reader may use
def snapshot_candidates(store: ObjectStore, coord: Coordinator) -> tuple[list[str], int]:
    """Published snapshots, newest first, and the newest published watermark (0: none).

    The pointer's snapshot comes first; then every older version still in the
    store (GC keeps PUPYL_SNAPSHOT_KEEP). A version newer than the pointer was
    never published (a compaction died before its pointer) and is not offered.
    When the pointer itself is unreadable, Redis's snapshot watermark bounds them.
    """
    layout = coord.layout
    try:
        pointer = json.loads(store.get(layout.snapshot_pointer))
        newest, first = int(pointer["watermark"]), [str(pointer["path"])]
    except ObjectNotFound:
        return [], 0  # nothing published: a snapshot folder without a pointer is a compaction that died
    except (ValueError, KeyError, TypeError):
        report(coord, layout.snapshot_pointer, "unreadable snapshot pointer", by="reader")
        newest, first = coord.snapshot_watermark(), []
    folder = f"{layout.root}/{C.STORE_SNAPSHOTS}"
    versions = sorted((int(n) for n in store.children(folder) if n.isdigit()), reverse=True)
    if not first and not newest:  # neither the pointer nor Redis says which: each candidate is checked anyway
        newest = max(versions, default=0)
    rest = [layout.snapshot(v) for v in versions if v <= newest and layout.snapshot(v) not in first]
    return first + rest, newest


def log_complete_after(coord: Coordinator, watermark: int) -> bool:
    """True when every commit after ``watermark`` is still in the commit log (none was trimmed away)."""
    if coord.last_sequence() <= watermark:
        return True
    first = coord.r.zrangebyscore(
        coord._k(C.KEY_COMMITS), f"({watermark}", "+inf", start=0, num=1, withscores=True
    )
    return bool(first) and int(first[0][1]) == watermark + 1


# --- checksums of committed objects
def record_checksum(coord: Coordinator, key: str, data: bytes) -> None:
    """Before publishing ``key``: its sha256, so readers can check what they get.

    The write paths pass the sha256 to the commit instead (``Coordinator.commit(checksum=...)``),
    which records it in the same Lua call; this is for restore and tests, which commit apart."""
    coord.r.hset(coord._k(KEY_CHECKSUMS), key, sha256(data))


def checksums(coord: Coordinator, keys: list[str]) -> dict[str, str | None]:
    if not keys:
        return {}
    return dict(zip(keys, coord.r.hmget(coord._k(KEY_CHECKSUMS), keys)))


def is_committed(coord: Coordinator, key: str) -> bool:
    return bool(coord.r.hexists(coord._k(C.KEY_COMMIT_BY_OBJECT), key))


def forget(coord: Coordinator, keys: list[str]) -> None:
    """Drop the checksums and damage records of objects that were deleted."""
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        with coord.r.pipeline() as pipe:
            pipe.hdel(coord._k(KEY_CHECKSUMS), *chunk)
            pipe.hdel(coord._k(KEY_DAMAGED), *chunk)
            pipe.execute()


def damaged_keys(coord: Coordinator) -> list[str]:
    return list(coord.r.hkeys(coord._k(KEY_DAMAGED)))


def forget_damage_under(coord: Coordinator, prefix: str) -> None:
    stale = [k for k in coord.r.hkeys(coord._k(KEY_DAMAGED)) if k.startswith(prefix)]
    if stale:
        coord.r.hdel(coord._k(KEY_DAMAGED), *stale)


# --- damage
def report(coord: Coordinator, key: str, reason: str, by: str) -> None:
    """Log and record damage; recording is best effort (the reader goes on either way)."""
    log.error("damaged store object %s: %s", key, reason)
    entry = {"reason": reason, "seen_at": time.time(), "by": f"{by}@{socket.gethostname()}:{os.getpid()}"}
    try:
        coord.r.hset(coord._k(KEY_DAMAGED), key, json.dumps(entry))
    except Exception:  # noqa: BLE001 - Redis down: the log line above is the record
        log.warning("could not record the damage of %s in Redis", key)


def damaged(client: Any, layout: Layout) -> dict[str, dict[str, Any]]:
    """Every damaged object recorded for a collection: store key -> {reason, seen_at, by}."""
    raw = client.hgetall(layout.key(KEY_DAMAGED))
    return {key: json.loads(value) for key, value in sorted(raw.items())}
