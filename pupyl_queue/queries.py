"""Search and remove, as run by the search and maintenance workers.

A query is JSON: ``{"image_b64": ...}`` (small images inline), ``{"key": ...}``
(bytes the client put in the store), ``{"id": N}`` (more like an indexed image)
or ``{"vector": [...]}``. A search's ``mode`` is ``"similar"`` (the default) or
``"copy"``: find the original of an edited copy (pupyl_queue/copysearch.py).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import time
import uuid
from typing import Any

import numpy as np
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.attributes import (
    Filter,
    InvalidAttribute,
    builtin_values,
    check_attributes,
    check_key,
    parse_filter,
)
from pupyl_queue.codecs import SegmentRows, decode_vectors, encode_segment, encode_vectors
from pupyl_queue.fencing import CompactionLock, FencedOut
from pupyl_queue.images import decode
from pupyl_queue.jobs import batch_id
from pupyl_queue.keys import commit_tombstone, retire
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import encode_batch, mark_removed
from pupyl_queue.metadata import read as read_metadata
from pupyl_queue.payloads import (
    CompactRequest,
    NearestRequest,
    NearestResult,
    RemoveRequest,
    RemoveResult,
    SearchRequest,
    SearchResult,
    SetAttributesRequest,
    SetAttributesResult,
)
from pupyl_queue.runtime import Runtime
from pupyl_queue.sharding import Send, fan_out, shard_vector
from pupyl_queue.store import ObjectNotFound, StoreUnavailable
from pupyl_queue.write_claim import WriteClaim

log = logging.getLogger(__name__)
UPDATE_ID = re.compile(r"[0-9a-f]{8,64}")


class QueryError(ValueError):
    """The query cannot be turned into a vector (bad image, unknown id, wrong size)."""


class NotCaughtUp(TimeoutError):
    """The searcher did not reach the requested commit sequence in time."""


def query_vector(rt: Runtime, collection: str, query: dict[str, Any], send: Send | None = None) -> np.ndarray:
    if "id" in query:
        try:
            if rt.is_router and send is not None:
                return shard_vector(rt, collection, int(query["id"]), send)
            return rt.searcher(collection).vector(int(query["id"]))
        except KeyError as exc:
            raise QueryError(str(exc.args[0])) from None
    if "vector" in query:
        return _unit_vector(query["vector"], rt.spec(collection).dim)
    data = query_bytes(rt, query)
    if data is None:
        raise QueryError("a query needs one of: image_b64, key, id, vector")
    extractor = rt.extractor(collection)
    size = extractor.input_size
    image = decode(data, rt.settings.max_pixels, target=size)  # as when indexing: same pixels, same vector
    return extractor.embed(image.pixels(size)[None])[0]


def query_bytes(rt: Runtime, query: dict[str, Any]) -> bytes | None:
    """A query image's bytes, inline or put in the store by the client; None for other queries."""
    if "image_b64" in query:
        return base64.b64decode(query["image_b64"], validate=True)
    if "key" in query:
        try:
            return rt.store.get(query["key"])
        except ObjectNotFound:
            raise QueryError("the uploaded query image is gone from the store") from None
    return None


def _unit_vector(values: Any, dim: int) -> np.ndarray:
    """A query vector scaled to unit length in float64: in float32, tiny values (1e-30) square to 0
    and every distance came out 0.0."""
    try:
        vector = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise QueryError("a query vector is a list of numbers") from None
    if vector.shape[0] != dim:
        raise QueryError(f"query vector has {vector.shape[0]} values, the collection {dim}")
    scale = float(np.abs(vector).max()) if np.isfinite(vector).all() else 0.0
    if scale == 0.0:
        raise QueryError("a query vector must be finite and not all zero")
    vector = vector / scale  # largest value 1: the norm below can neither overflow nor vanish
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def search(rt: Runtime, task: SearchRequest, send: Send | None = None) -> SearchResult:
    """Rank a collection by a query; a router of a sharded cluster fans out through ``send``."""
    collection = task.get("collection", "default")
    top = int(task.get("top", 4))
    if not 1 <= top <= 10_000:
        raise QueryError("top must be between 1 and 10000")
    if task.get("mode", "similar") not in C.SEARCH_MODES:
        raise QueryError(f"mode must be one of {', '.join(C.SEARCH_MODES)}")
    started = time.perf_counter()
    # An uploaded query image is deleted once the search is over, not as soon as it is embedded: a
    # search whose worker dies is delivered again (acks_late), and a transient failure is retried;
    # either must still find its query image.
    try:
        answer = _search(rt, task, collection, top, started, send)
    except (StoreUnavailable, redis.ConnectionError, redis.TimeoutError):
        raise
    except BaseException:
        _drop_query(rt, task)
        raise
    _drop_query(rt, task)
    return answer


def _drop_query(rt: Runtime, task: dict[str, Any]) -> None:
    if "key" in task["query"]:
        rt.store.delete(task["query"]["key"])


def rank(
    rt: Runtime, collection: str, vectors: np.ndarray, top: int, task: dict[str, Any], send: Send | None
) -> tuple[list[list[tuple[int, float]]], dict[str, Any]]:
    """Each vector's ``top`` hits: by this worker's searcher (caught up to the task's ``min_sequence``),
    or on a router by the shards. ``info`` has the sequence, the count, and ``degraded``/``damaged``
    only when the store had damage the searcher routed around."""
    where = search_filter(task)  # a bad filter fails here, before any shard is asked
    if rt.is_router:
        if send is None:
            raise RuntimeError("a search router needs a way to reach its shards")
        return fan_out(rt, collection, vectors, top, task, send)
    searcher = rt.searcher(collection)
    wanted = int(task.get("min_sequence") or 0)
    if wanted and not searcher.wait_for(wanted, float(task.get("wait_timeout", 30))):
        raise NotCaughtUp(f"searcher is at sequence {searcher.sequence}, asked for {wanted}")
    hits = searcher.search_many(vectors, top, where)
    return hits, {"sequence": searcher.sequence, "count": len(searcher), **searcher.health()}


def search_filter(task: dict[str, Any]) -> Filter | None:
    """The task's ``filter`` (attributes.parse_filter's language), or None; a bad one is a QueryError."""
    try:
        return parse_filter(task.get("filter"))
    except InvalidAttribute as exc:
        raise QueryError(f"filter: {exc}") from None


def _search(
    rt: Runtime, task: dict[str, Any], collection: str, top: int, started: float, send: Send | None
) -> dict[str, Any]:
    if task.get("mode") == "copy":
        from pupyl_queue.copysearch import search_copies  # OpenCV: loaded by the first copy search

        return search_copies(rt, task, collection, top, started, send)
    vector = query_vector(rt, collection, task["query"], send)
    (hits,), info = rank(rt, collection, vector[None], top, task, send)
    results: list[dict[str, Any]] = [{"id": image_id, "distance": distance} for image_id, distance in hits]
    for row, key in zip(results, rt.coordinator(collection).keys_of([i for i, _ in hits])):
        if key is not None:
            row["key"] = key  # the caller's key (one HMGET for the whole answer)
    if task.get("metadata"):
        for row, meta in zip(results, metadata(rt, Layout(collection), [i for i, _ in hits])):
            row["metadata"] = meta
    return {
        "collection": collection,
        **info,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
        "results": results,
    }


def metadata(rt: Runtime, layout: Layout, ids: list[int]) -> list[dict[str, Any] | None]:
    """Each image's metadata (None when it is gone): one Redis round trip, then one store GET per
    batch object the hits sit in, concurrently (pupyl_queue/metadata.py)."""
    return read_metadata(rt.store, rt.redis, layout, ids)


def nearest_request(collection: str, vectors: np.ndarray, top: int | None = None) -> NearestRequest:
    """The ``pupyl.nearest`` kwargs an embed worker sends (near-duplicate and copy-mode checks)."""
    request: NearestRequest = {"collection": collection, **encode_vectors(vectors)}
    if top is not None:
        request["top"] = int(top)
    return request


def nearest(rt: Runtime, task: NearestRequest, send: Send | None = None) -> NearestResult:
    """Each vector's nearest indexed image (near-duplicate checks of the embed workers).

    With ``top`` above 1 also each vector's ``candidates``: the short lists of the copy-mode check.
    With ``top`` 1 the distance is the raw cosine distance even in a whitened collection (its few
    whitened nearest re-scored), so ``near_duplicate`` thresholds mean what they always meant.
    """
    collection = task.get("collection", "default")
    vectors = decode_vectors(task)
    top = int(task.get("top") or 1)
    if not 1 <= top <= 200:
        raise QueryError("top must be between 1 and 200")
    # The vector check (top 1) compares a raw cosine distance with its threshold, whitened or not
    # (README, "Whitening"); copy mode's short lists (top > 1) keep the whitened ranking.
    raw = top == 1
    if rt.is_router and send is not None:
        hits, info = fan_out(rt, collection, vectors, top, task, send, raw_distances=raw)
        health = {k: info[k] for k in ("degraded", "damaged") if k in info}
    else:
        searcher = rt.searcher(collection)
        hits, health = searcher.search_many(vectors, top, raw_distances=raw), searcher.health()
    # A degraded answer may miss a duplicate whose vector sat in a damaged segment: the caller is told.
    answer = {"nearest": [[row[0][0], row[0][1]] if row else None for row in hits], **health}
    if top > 1:
        answer["candidates"] = [[[image_id, distance] for image_id, distance in row] for row in hits]
    return answer


def remove(rt: Runtime, task: RemoveRequest) -> RemoveResult:
    """Tombstone an id (committed like a segment), then delete its image and metadata.

    ``{"key": ...}`` instead of ``{"id": ...}`` removes the image a caller's key names now; the
    tombstone's commit forgets the key (a key upserted again meanwhile names a newer id: it stays).
    """
    collection = task.get("collection", "default")
    layout = Layout(collection)
    coord = rt.coordinator(collection)
    if task.get("id") is None and task.get("key") is not None:
        found = coord.lookup(str(task["key"]))
        if found is None:
            return {
                "key": task["key"],
                "removed": False,
                "reason": f"no image with key {str(task['key'])[:256]!r}",
            }
        return {"key": task["key"], **remove(rt, {"collection": collection, "id": found["id"]})}
    image_id = int(task["id"])
    tombstone = layout.tombstone(image_id)
    meta = read_metadata(rt.store, rt.redis, layout, [image_id])[0]
    if meta is None and not rt.store.exists(tombstone):
        return {"id": image_id, "removed": False, "reason": f"no image with id {image_id}"}
    record = {"id": image_id, "removed_at": time.time()}
    images = -1 if meta is not None else 0
    sequence = commit_tombstone(rt.store, coord, tombstone, record, images=images, removes=image_id)
    if meta is not None:  # (None: removed before; a compaction may have pruned it from the set since)
        coord.release_hash(meta["sha256"], image_id)
        mark_removed(rt.redis, layout, [image_id])  # its entry in the batch's metadata object reads as gone
    rt.store.delete(layout.image(image_id))
    rt.store.delete(layout.original(image_id))
    rt.store.delete(layout.image_meta(image_id))  # a collection written before batch objects
    rt.store.delete(layout.local_features(image_id))
    return {"id": image_id, "removed": True, "sequence": sequence}


def set_attributes(rt: Runtime, task: SetAttributesRequest, send: Send | None = None) -> SetAttributesResult:
    """New attributes for the image a caller's key names, without running the network again.

    The image's vector (from this search worker, or its shard) goes into a one-row segment under a
    new id, with the same stored copy and metadata but the new attributes; its commit takes the key
    over and tombstones the old id, like any upsert, so every reader, compaction, rebuild and backup
    handles it as one. It commits only while the key still names the image read here: a key upserted
    meanwhile is left alone (``updated: false``). ``update_id`` (a fresh hex id per request) makes a
    redelivered task finish the same update instead of making another.
    """
    collection = task.get("collection", "default")
    layout, coord = Layout(collection), rt.coordinator(collection)
    try:
        key, attributes = check_key(task.get("key")), check_attributes(task.get("attributes"))
    except InvalidAttribute as exc:
        raise QueryError(str(exc)) from None
    update_id = str(task.get("update_id") or uuid.uuid4().hex)
    if not UPDATE_ID.fullmatch(update_id):
        raise QueryError("update_id is 8 to 64 hex digits")
    owner = batch_id(update_id, 0)
    segment = layout.segment(owner)
    new_id = coord.allocate_ids(owner, 1)[0]
    # Two live runs of one update (a redelivery while the first still runs) both found the segment
    # uncommitted, and the later one rewrote it after the other's commit had recorded the checksum
    # of other bytes (its metadata's attributes_updated_at). Only the run holding the segment's
    # write claim writes it (write_claim.py); another waits for that run's commit, then finishes
    # the update as a redelivery does.
    claim = WriteClaim(coord, segment)
    if claim.acquire():  # one round trip, as the "committed?" check it replaces
        try:
            return _update_attributes(rt, layout, key, attributes, owner, new_id, claim, send)
        finally:
            claim.release()  # unless its commit let it go: an update that failed, or changed nothing
    sequence, replaced = coord.commit(segment)  # committed: finish what the first run began
    retire(rt.store, coord, replaced, {key: new_id})
    return {"key": key, "updated": True, "id": new_id, "sequence": sequence}


def _update_attributes(
    rt: Runtime,
    layout: Layout,
    key: str,
    attributes: dict[str, Any],
    owner: str,
    new_id: int,
    claim: WriteClaim,
    send: Send | None,
) -> SetAttributesResult:
    """set_attributes' one-row segment, written and committed by the run holding its write claim."""
    coord, segment = claim.coord, claim.store_key
    found = coord.lookup(key)
    if found is None:
        return {"key": key, "updated": False, "reason": f"no image with key {key[:256]!r}"}
    old_id = int(found["id"])
    meta = read_metadata(rt.store, rt.redis, layout, [old_id])[0]
    if meta is None:
        return {"key": key, "updated": False, "reason": f"image {old_id} was removed meanwhile; try again"}
    vector = query_vector(rt, layout.collection, {"id": old_id}, send)
    copies = [
        (layout.image(old_id), layout.image(new_id)),
        (layout.original(old_id), layout.original(new_id)),
    ]
    for source, target in copies:
        with contextlib.suppress(ObjectNotFound):  # no original unless PUPYL_KEEP_ORIGINALS
            rt.store.put(target, rt.store.get(source))
    meta = {**{k: v for k, v in meta.items() if k != "attributes"}, "id": new_id, "replaces": old_id}
    meta.update({"attributes": attributes} if attributes else {}, attributes_updated_at=time.time())
    if "internal_path" in meta:
        meta["internal_path"] = f"{rt.store.url.rstrip('/')}/{layout.image(new_id)}"
    rt.store.put(layout.batch_meta(owner), encode_batch(owner, [meta]))  # a batch of one: its id's range
    rows = SegmentRows([key], [meta["sha256"]], [attributes or None], [builtin_values(meta)])
    data = encode_segment(np.array([new_id]), vector[None], rows)
    rt.store.put(segment, data)
    sequence, replaced = coord.commit(
        segment,
        images=1,
        keyed=[(key, new_id, meta["sha256"])],
        expect=old_id,
        checksum=integrity.sha256(data),
        writer=claim.token,
    )
    if not sequence:  # the key moved on meanwhile: this update never happened
        for path in (segment, layout.image(new_id), layout.original(new_id), layout.batch_meta(owner)):
            rt.store.delete(path)
        integrity.forget(coord, [segment])
        return {
            "key": key,
            "updated": False,
            "reason": "the key was upserted or removed meanwhile; try again",
        }
    claim.committed()  # the commit let the claim go
    retire(rt.store, coord, replaced, {key: new_id})
    return {"key": key, "updated": True, "id": new_id, "replaced": old_id, "sequence": sequence}


def compact(rt: Runtime, task: CompactRequest) -> dict[str, Any]:
    """Write a snapshot of the collection (one compaction at a time, whatever the replicas).

    A short lock, renewed while the compaction runs: a compaction killed with its worker (kill -9,
    OOM) used to hold a 6-hour lock. Its fencing token (fencing.py) stops a run that lost the lock
    (a stall or a cut from Redis longer than PUPYL_COMPACT_LOCK_S) before its next write: it
    answers ``skipped`` and publishes nothing, so it can neither move the pointer back nor delete
    the output of the run that took the lock over.
    """
    from pupyl_queue.compaction import Compactor

    collection = task.get("collection", "default")
    layout = Layout(collection)
    lock = CompactionLock(rt.redis, rt.store, layout, max(1, rt.settings.compact_lock_s))
    if not lock.acquire():
        return {"collection": collection, "skipped": "another compaction is running"}
    try:
        with lock.renewed():
            compactor = Compactor(rt.store, rt.coordinator(collection), rt.settings, fence=lock)
            return compactor.run(rt.spec(collection).to_json())
    except FencedOut as exc:
        log.warning("compaction of %s stopped, nothing published: %s", collection, exc)
        return {"collection": collection, "skipped": f"lost the compaction lock to another run ({exc})"}
    finally:
        rt.redis.delete(layout.key("compact-due"))
        lock.release()
