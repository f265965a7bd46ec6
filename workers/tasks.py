"""Celery tasks: thin wrappers that give the pupyl_queue functions a name and a queue.

Task contracts (names, JSON kwargs, JSON results) are public: see docs/tasks.md.
Transient failures (store or Redis unreachable) are retried with backoff;
a bad request fails the task with a clear message and is not retried.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import shared_task
from celery.signals import worker_ready

from pupyl_queue import constants as C
from pupyl_queue import embedding, ingest, queries, sharding
from pupyl_queue.collection import list_collections
from pupyl_queue.runtime import runtime
from pupyl_queue.store import StoreUnavailable

log = logging.getLogger(__name__)
TRANSIENT = (StoreUnavailable, redis.ConnectionError, redis.TimeoutError)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, max_retries=12)


@shared_task(name=C.TASK_INDEX, bind=True, **RETRY)
def index(self: Any, **job: Any) -> dict[str, Any]:
    rt = runtime()
    job.setdefault("job_id", self.request.id)
    try:
        return ingest.expand_job(rt, job, lambda batch: embed.apply_async(kwargs=batch))
    except TRANSIENT:
        raise
    except Exception as exc:
        rt.coordinator(job["collection"]).update_job(
            job["job_id"], state="failed", error=f"{type(exc).__name__}: {exc}"
        )
        raise


def ask_nearest(collection: str, vectors: Any) -> list[tuple[int, float] | None]:
    """Near-duplicate lookup on the search workers, which hold the index (embed workers do not)."""
    request = {"collection": collection, **queries.encode_vectors(vectors)}
    result = nearest.apply_async(kwargs=request)
    answer = result.get(timeout=runtime().settings.search_timeout, disable_sync_subtasks=False)
    return [None if row is None else (int(row[0]), float(row[1])) for row in answer["nearest"]]


@shared_task(name=C.TASK_EMBED, bind=True, **RETRY)
def embed(self: Any, **batch: Any) -> dict[str, Any]:
    rt = runtime()
    try:
        result = embedding.embed_batch(rt, batch, ask_nearest)
        if embedding.compaction_due(rt, batch["collection"], result.get("sequence")):
            compact.apply_async(kwargs={"collection": batch["collection"]})
        return result
    except TRANSIENT:
        raise
    except Exception as exc:
        rt.coordinator(batch["collection"]).update_job(
            batch["job_id"], state="failed", error=f"{type(exc).__name__}: {exc}"
        )
        raise


def to_shard(shard: int, request: dict[str, Any]) -> Any:
    return search_shard.apply_async(kwargs=request, queue=C.shard_queue(shard))


@shared_task(name=C.TASK_SEARCH, **RETRY)
def search(**request: Any) -> dict[str, Any]:
    return queries.search(runtime(), request, to_shard)


@shared_task(name=C.TASK_SEARCH_SHARD, **RETRY)
def search_shard(**request: Any) -> dict[str, Any]:
    return sharding.shard_search(runtime(), request)


@shared_task(name=C.TASK_NEAREST, **RETRY)
def nearest(**request: Any) -> dict[str, Any]:
    return queries.nearest(runtime(), request, to_shard)


@shared_task(name=C.TASK_REMOVE, **RETRY)
def remove(**request: Any) -> dict[str, Any]:
    return queries.remove(runtime(), request)


@shared_task(name=C.TASK_COMPACT, **RETRY)
def compact(**request: Any) -> dict[str, Any]:
    return queries.compact(runtime(), request)


@shared_task(name=C.TASK_COMPACT_ALL, **RETRY)
def compact_all() -> dict[str, Any]:
    """Celery beat's periodic compaction: queue one per collection that has new commits."""
    rt = runtime()
    queued = []
    for name in list_collections(rt.store):
        coord = rt.coordinator(name)
        if coord.last_sequence() > coord.snapshot_watermark():
            compact.apply_async(kwargs={"collection": name})
            queued.append(name)
    return {"queued": queued}


@worker_ready.connect
def preload_searchers(sender: Any = None, **_: Any) -> None:
    """A search worker loads every collection's index and model at start, not on the first query.

    Search workers run ``--pool solo``, so this is the process that answers.
    """
    queues = {q.name for q in getattr(sender.task_consumer, "queues", [])} if sender else set()
    rt = runtime()
    if not any(q.split(".")[0] == C.QUEUE_SEARCH for q in queues) or rt.is_router:
        return
    for name in list_collections(rt.store):
        try:
            searcher = rt.searcher(name)
            rt.extractor(name)
            log.info(
                "collection %s loaded: %d vectors at sequence %d", name, len(searcher), searcher.sequence
            )
        except Exception:
            log.exception("could not preload collection %s; it loads on its first search", name)
