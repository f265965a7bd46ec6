"""Collections: list, describe and delete (each under its own store prefix and Redis keys)."""

from __future__ import annotations

import json
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.codecs import read_manifest, read_pointer
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import damaged
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectStore

__all__ = ["CollectionMissing", "delete_collection", "describe_collection", "list_collections"]


class CollectionMissing(LookupError):
    """Searching or removing in a collection nothing was ever indexed into."""


def list_collections(store: ObjectStore) -> list[str]:
    """Collections that hold a manifest (were indexed into at least once)."""
    names = store.children(C.STORE_COLLECTIONS)
    return [name for name in names if store.exists(Layout(name).manifest)]


WHITENING_KEYS = ("whitening", "whitening_pending")  # in snapshots of collections with whitening only


def describe_collection(store: ObjectStore, client: redis.Redis, name: str) -> dict[str, Any]:
    layout = Layout(name)
    manifest = read_manifest(store, layout)
    if manifest is None:
        raise CollectionMissing(f"no collection {name!r}")
    coord = Coordinator(client, layout)
    snapshot = read_pointer(store, layout)
    return {
        "name": name,
        "model": manifest["model"],
        "dim": manifest["model"]["dim"],
        "precision": manifest["model"].get("precision", "float32"),
        "whitening": manifest["model"].get("whitening", C.DEFAULT_WHITENING),
        "created_at": manifest["created_at"],
        "images": coord.image_count(),
        "sequence": coord.last_sequence(),
        "index_type": snapshot["index_type"] if snapshot else "IDMap2,Flat",
        "last_snapshot": None
        if snapshot is None
        else {
            key: snapshot[key]
            for key in ("watermark", "count", "factory", "nprobe", "created_at", *WHITENING_KEYS)
            if key in snapshot
        },
        # Store objects found truncated or altered (integrity.py): key -> {reason, seen_at, by}.
        "damaged": damaged(client, layout),
    }


def delete_collection(store: ObjectStore, client: redis.Redis, name: str) -> dict[str, Any]:
    """Delete everything of one collection, and only it: its store prefix, its Redis keys, its jobs."""
    layout = Layout(name)
    if read_manifest(store, layout) is None and not store.children(layout.root):
        raise CollectionMissing(f"no collection {name!r}")
    keys = list(client.scan_iter(match=f"{C.REDIS_PREFIX}:{name}:*", count=1000))
    jobs = []
    for key in client.scan_iter(match=f"{C.REDIS_PREFIX}:{C.KEY_JOB}:*", count=1000):
        if key.endswith(":batches"):
            continue
        if client.hget(key, "collection") in (name, json.dumps(name)):
            jobs.extend([key, key + ":batches"])
    for chunk in range(0, len(keys + jobs), 500):
        client.delete(*(keys + jobs)[chunk : chunk + 500])
    objects = store.delete_prefix(layout.root + "/")
    return {"name": name, "deleted_objects": objects, "deleted_keys": len(keys) + len(jobs)}
