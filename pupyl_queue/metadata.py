"""Image metadata: one store object per embed batch, found by id through a range index in Redis.

Why (issue #15): one metadata object per image made the store work per indexed image two
writes (the stored copy and its metadata). An embed batch now writes ``meta/<batch id>.json``
once, holding every kept image of the batch, beside its segment ``segments/<batch id>.npz``.

Finding an id's object costs no write of its own: ids are allocated per batch as one contiguous
range (coordination._ALLOCATE), and the same Lua call records the range's first id in a sorted
set (``meta-ranges``: score = first id, member = batch id). The batch holding an id is the member
with the greatest score not above it: one ZREVRANGEBYSCORE, pipelined for all ids of a search.

Removal cannot take one image out of a shared object without rewriting it (a read-modify-write
that concurrent removals would race), so a removed id goes into the set ``removed``; readers
answer None for it. Both Redis structures are derived from the store (``rebuild_index``): the
ranges from the batch objects, the removed ids from tombstones and snapshots; ``pupyl-queue
rebuild`` and restore call it.

The price is on the read side: a read fetches the whole batch object (about 470 bytes per image:
~120 KB for a batch of 256) where it fetched one image's; the hits of one search that sit in the
same batch share one GET. Removed images' entries stay in their batch object's bytes (the set
hides them; a backup copies them too).

Redis is needed to find a batch object: after Redis lost its data, ids of batch objects read as
absent until ``pupyl-queue rebuild`` (which any Redis loss needs anyway: ids, commit log, dedup).

Collections written before this layout keep one ``images/<id>.json`` per image: an id that no
batch object holds is read there (the fallback), and removal still deletes that object.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from pupyl_queue import constants as C
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore

FORMAT = 1  # of a batch object: {"format": 1, "batch": <batch id>, "images": {"<id>": {...}}}
READ_THREADS = 16  # concurrent store GETs for one read (a search's hits sit in many batches)

Meta = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")


def encode_batch(batch_id: str, metas: Iterable[Meta]) -> bytes:
    """The batch object: each kept image's metadata under its id."""
    images = {str(meta["id"]): meta for meta in metas}
    return json.dumps({"format": FORMAT, "batch": batch_id, "images": images}).encode()


def decode_batch(data: bytes) -> dict[int, Meta]:
    return {int(image_id): meta for image_id, meta in json.loads(data)["images"].items()}


def read(store: ObjectStore, client: redis.Redis, layout: Layout, ids: list[int]) -> list[Meta | None]:
    """Each id's metadata, None when it is removed or unknown: one Redis round trip for all the
    ids, then one GET per distinct batch object (concurrently), and a GET of the old per-image
    object for an id that no batch object holds."""
    if not ids:
        return []
    batches = _batches_of(client, layout, ids)
    wanted: dict[str, list[int]] = defaultdict(list)
    for n, batch in enumerate(batches):
        if batch:
            wanted[batch].append(n)
    found: list[Meta | None] = [None] * len(ids)
    for batch, held in zip(wanted, _each(lambda b: _get_batch(store, layout, b), list(wanted))):
        for n in wanted[batch]:
            found[n] = held.get(ids[n])
    old = [n for n, batch in enumerate(batches) if batch is not None and found[n] is None]
    for n, meta in zip(old, _each(lambda n: _get_one(store, layout, ids[n]), old)):
        found[n] = meta
    return found


def _each(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``fn`` of every item, concurrently when there are several (each is a store round trip)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(READ_THREADS, len(items)), thread_name_prefix="pupyl-meta") as pool:
        return list(pool.map(fn, items))


def read_one(store: ObjectStore, client: redis.Redis, layout: Layout, image_id: int) -> Meta | None:
    return read(store, client, layout, [image_id])[0]


def mark_removed(client: redis.Redis, layout: Layout, ids: Iterable[int]) -> None:
    """From now on these ids read as absent (call it once the removal is committed)."""
    ids = [int(i) for i in ids]
    if ids:
        client.sadd(layout.key(C.KEY_REMOVED), *ids)


def _batches_of(client: redis.Redis, layout: Layout, ids: list[int]) -> list[str | None]:
    """Per id: the batch whose range holds it, '' when none does (an id from before this layout),
    None when it was removed."""
    with client.pipeline(transaction=False) as pipe:
        for image_id in ids:
            pipe.zrevrangebyscore(layout.key(C.KEY_META_RANGES), int(image_id), "-inf", start=0, num=1)
            pipe.sismember(layout.key(C.KEY_REMOVED), int(image_id))
        answers = pipe.execute()
    out: list[str | None] = []
    for hit, removed in zip(answers[::2], answers[1::2]):
        out.append(None if removed else _text(hit[0]) if hit else "")
    return out


def _get_batch(store: ObjectStore, layout: Layout, batch_id: str) -> dict[int, Meta]:
    try:
        return decode_batch(store.get(layout.batch_meta(batch_id)))
    except ObjectNotFound:
        return {}  # ids allocated to a batch that kept nothing (or has not committed yet)


def _get_one(store: ObjectStore, layout: Layout, image_id: int) -> Meta | None:
    try:
        return json.loads(store.get(layout.image_meta(image_id)))
    except ObjectNotFound:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def rebuild_index(
    store: ObjectStore, client: redis.Redis, layout: Layout, removed: set[int]
) -> dict[str, int]:
    """Derive the range index and the removed set from the store; return sha256 -> id of every
    image still indexed (the dedup map), from both layouts.

    ``removed``: every id removed (tombstones in the store and the snapshots' removed lists).
    """
    live: dict[str, int] = {}
    ranges: dict[str, int] = {}
    for key in store.list(f"{layout.root}/{C.STORE_META}/"):
        held = decode_batch(store.get(key))
        if not held:
            continue
        ranges[key.rsplit("/", 1)[-1].removesuffix(".json")] = min(held)
        for image_id, meta in held.items():
            if image_id not in removed:
                live[meta["sha256"]] = image_id
    for key in store.list(f"{layout.root}/{C.STORE_IMAGES}/"):
        if key.endswith(".json"):  # the layout before batch objects; removal deleted these
            meta = json.loads(store.get(key))
            if int(meta["id"]) not in removed:
                live[meta["sha256"]] = int(meta["id"])
    if ranges:
        client.zadd(layout.key(C.KEY_META_RANGES), ranges)
    mark_removed(client, layout, removed)
    return live
