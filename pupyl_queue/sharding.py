"""Sharded search: past one machine's memory, N search workers each own a partition of ids.

Shard k holds the ids with ``id % N == k`` (from the same commit log and
snapshots as everyone else) and listens on its own queue, ``search.shard<k>``;
its replicas share that queue. A router (a search worker with no shard, on the
``search`` queue) embeds the query once, sends it to every shard, and merges
the top-k lists. A shard that does not answer in time makes the search fail
loudly, or, when the caller passes ``allow_partial``, marks the answer partial
and names the missing shards: never silently short.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pupyl_queue.attributes import parse_filter
from pupyl_queue.codecs import decode_vectors, encode_vectors
from pupyl_queue.payloads import (
    NearestRequest,
    SearchRequest,
    ShardRequest,
    ShardSearchRequest,
    ShardSearchResult,
    ShardVectorRequest,
    ShardVectorResult,
)
from pupyl_queue.runtime import Runtime

Send = Callable[[int, ShardRequest], Any]  # (shard, request) -> a Celery AsyncResult


class ShardUnavailable(RuntimeError):
    """A shard did not answer in time, and the caller did not accept a partial answer."""


def shard_search(rt: Runtime, task: ShardRequest) -> ShardSearchResult | ShardVectorResult:
    """What a shard answers: its own top-k for each vector, or one of its vectors by id."""
    searcher = rt.searcher(task.get("collection", "default"))
    wanted = int(task.get("min_sequence") or 0)
    if wanted and not searcher.wait_for(wanted, float(task.get("wait_timeout", 30))):
        raise TimeoutError(f"shard at sequence {searcher.sequence}, asked for {wanted}")
    if "id" in task:
        return encode_vectors(searcher.vector(int(task["id"]))[None])
    where = parse_filter(task.get("filter"))  # checked by the router already
    raw = bool(task.get("raw_distances"))  # the vector near-duplicate check (queries.nearest)
    hits = searcher.search_many(decode_vectors(task), int(task["top"]), where, raw_distances=raw)
    return {
        "hits": [[[i, d] for i, d in row] for row in hits],
        "sequence": searcher.sequence,
        "count": len(searcher),
        **searcher.health(),  # damage this shard routed around reaches the caller too
    }


def shard_vector(rt: Runtime, collection: str, image_id: int, send: Send) -> np.ndarray:
    """An indexed image's vector, from the shard that owns it."""
    request: ShardVectorRequest = {"collection": collection, "id": image_id}
    answer = send(image_id % rt.settings.search_shards, request)
    return decode_vectors(answer.get(timeout=rt.settings.search_timeout, disable_sync_subtasks=False))[0]


def fan_out(
    rt: Runtime,
    collection: str,
    vectors: np.ndarray,
    top: int,
    task: SearchRequest | NearestRequest,
    send: Send,
    raw_distances: bool = False,
) -> tuple[list[list[tuple[int, float]]], dict[str, Any]]:
    """Every shard's top-k for each vector, merged; and whether the answer is whole.

    ``task`` is the search (or nearest) request: its ``min_sequence``, ``wait_timeout``, ``filter``,
    ``shard_timeout`` and ``allow_partial`` apply to the fan-out. ``raw_distances``: each shard
    re-scores its whitened hits by raw cosine (the vector near-duplicate check; Searcher.search_many).
    """
    request = shard_request(collection, vectors, top, task)
    if raw_distances:
        request["raw_distances"] = True
    shards = rt.settings.search_shards
    timeout = float(task.get("shard_timeout") or rt.settings.search_timeout)
    pending = {k: send(k, request) for k in range(shards)}
    deadline = time.monotonic() + timeout
    answers: dict[int, dict[str, Any]] = {}
    missing: list[int] = []
    for shard, result in pending.items():
        try:
            left = max(0.05, deadline - time.monotonic())
            answers[shard] = result.get(timeout=left, disable_sync_subtasks=False)
        except Exception:  # a timeout or a shard's own failure: either way, no answer from it
            missing.append(shard)
    if missing and not task.get("allow_partial"):
        raise ShardUnavailable(
            f"search shards {missing} of {shards} did not answer within {timeout:.0f}s; "
            "the answer would be incomplete (pass allow_partial to accept a partial answer)"
        )
    merged = []
    for row in range(len(vectors)):
        rows = (tuple(hit) for answer in answers.values() for hit in answer["hits"][row])
        merged.append([(int(i), float(d)) for i, d in heapq.nsmallest(top, rows, key=lambda hit: hit[1])])
    info = {
        "partial": bool(missing),
        "missing_shards": missing,
        "count": sum(a["count"] for a in answers.values()),
        "sequence": min((a["sequence"] for a in answers.values()), default=0),
        **merged_health(list(answers.values())),
    }
    return merged, info


def shard_request(
    collection: str, vectors: np.ndarray, top: int, task: SearchRequest | NearestRequest
) -> ShardSearchRequest:
    """The ``pupyl.search_shard`` kwargs a router sends every shard for a search (or nearest) request."""
    request: ShardSearchRequest = {
        "collection": collection,
        "top": top,
        **encode_vectors(vectors),
        "min_sequence": int(task.get("min_sequence") or 0),
        "wait_timeout": task.get("wait_timeout", 30),
    }
    if task.get("filter") is not None:
        request["filter"] = task["filter"]
    return request


def merged_health(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``degraded``/``damaged`` for the whole answer, from the shards that reported damage."""
    damaged = {d["key"]: d for answer in answers for d in answer.get("damaged", [])}
    if not damaged:
        return {}
    return {
        "degraded": any(answer.get("degraded") for answer in answers),
        "damaged": [damaged[key] for key in sorted(damaged)],
    }
