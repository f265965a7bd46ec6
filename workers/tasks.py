"""Celery tasks: thin wrappers that give the pupyl_queue functions a name and a queue.

Task contracts (names, JSON kwargs, JSON results) are public: see docs/tasks.md.
Transient failures (store or Redis unreachable) are retried with backoff;
a bad request fails the task with a clear message and is not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from celery import Task, shared_task
from celery.signals import worker_ready
from kombu.exceptions import OperationalError

from pupyl_queue import constants as C
from pupyl_queue import embedding, ingest, jobs, queries, sharding
from pupyl_queue.backoff import retrying
from pupyl_queue.catalog import list_collections
from pupyl_queue.coordination import WriteClaimBusy, WriteClaimLost
from pupyl_queue.payloads import (
    CompactAllResult,
    CompactRequest,
    EmbedRequest,
    EmbedResult,
    HousekeepResult,
    IndexRequest,
    IndexResult,
    NearestRequest,
    NearestResult,
    RemoveRequest,
    RemoveResult,
    SearchRequest,
    SearchResult,
    SetAttributesRequest,
    SetAttributesResult,
    ShardRequest,
    ShardSearchResult,
    ShardVectorResult,
    SweepJobsResult,
)
from pupyl_queue.runtime import runtime
from pupyl_queue.store import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# Redis is the broker as well as the coordination store: while it is down, both fail.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError)
# Another live run of the same batch held its write claim too long, or took it over (write_claim.py):
# retried, the batch is found committed or its claim free.
TRANSIENT = (StoreUnavailable, WriteClaimBusy, WriteClaimLost, *REDIS_DOWN)
REDIS_WAIT_S = C.REDIS_WAIT_S  # how long a task waits in place for Redis before Celery's retry takes over


def count_retries(kwargs: dict[str, Any], exc: BaseException, times: int = 1) -> None:
    """Count retries of a job's task into its job state: ``retries`` and ``last_retry`` (docs/tasks.md).

    Redis only (the store may be the part that is down); a Redis that is down too costs the count,
    never the retry.
    """
    job_id, collection = kwargs.get("job_id"), kwargs.get("collection")
    if not job_id or not collection:
        return
    try:
        coord = runtime().coordinator(collection)
        with coord.r.pipeline() as pipe:
            pipe.hincrby(coord.layout.job_key(job_id), "retries", times)
            pipe.hset(coord.layout.job_key(job_id), "last_retry", f"{type(exc).__name__}: {exc}")
            pipe.execute()
    except REDIS_DOWN:
        log.warning("job %s: could not count a retry (Redis unreachable)", job_id)


class JobTask(Task):  # type: ignore[misc]
    """A task of a bulk job: each retry of a transient failure shows in the job's state, and a
    failure for good (retries spent, or a bug) ends its batch, or its job, with the reason.

    Without on_failure a batch that failed for good was never counted, and its job stayed
    ``running`` for ever. When even this handler cannot reach Redis, the sweep (jobs.py) ends it.
    """

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        count_retries(kwargs, exc)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id") or task_id  # an index task's id is its job's
        if not kwargs.get("collection"):
            return
        retries = self.request.retries
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TRANSIENT):
            reason = f"gave up after {retries} retries: {reason}"
        rt = runtime()
        try:
            if self.name == C.TASK_EMBED:
                jobs.fail_batch(rt.redis, lambda: rt.store, kwargs, reason, ttl=rt.settings.job_ttl)
            else:
                jobs.fail_job(
                    rt.redis, lambda: rt.store, job_id, kwargs["collection"], reason, ttl=rt.settings.job_ttl
                )
        except REDIS_DOWN:
            log.error("job %s: could not record a failure (Redis unreachable); the sweep will", job_id)


def riding_out_redis(task: Any, kwargs: dict[str, Any], body: Callable[[], T]) -> T:
    """Run ``body``; while Redis is unreachable, wait here for it and run ``body`` again.

    Celery's retry sends a new message through the broker. With Redis down that send fails and
    Celery rejects the delivery without requeue; the message stays unacknowledged in Redis until
    the visibility timeout (hours) brings it back, so the job looked stuck until then (a Redis
    restart in tests/test_faults.py). Waiting in the task keeps the delivery. Task bodies are
    idempotent, so running one again is safe. Past REDIS_WAIT_S, Celery's retry takes over.
    """
    waits: list[BaseException] = []

    def on_wait(exc: BaseException, pause: float) -> None:
        log.warning("%s[%s]: Redis unreachable (%s); again in %.1fs", task.name, task.request.id, exc, pause)
        waits.append(exc)

    result = retrying(body, REDIS_DOWN, wait_s=REDIS_WAIT_S, first_s=0.5, max_s=10.0, on_wait=on_wait)
    if waits:
        count_retries(kwargs, waits[-1], len(waits))
    return result


# PUPYL_TASK_RETRIES and PUPYL_TASK_RETRY_BACKOFF_MAX (12 and 60 s: about ten minutes in all).
_settings = runtime().settings
RETRY = dict(
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=_settings.task_retry_backoff_max,
    max_retries=_settings.task_retries,
)
JOB_RETRY = dict(base=JobTask, **RETRY)


@shared_task(name=C.TASK_INDEX, bind=True, **JOB_RETRY)
def index(self: Any, **kwargs: Any) -> IndexResult:
    rt = runtime()
    kwargs.setdefault("job_id", self.request.id)
    job = cast(IndexRequest, kwargs)  # the task's JSON kwargs (docs/tasks.md; pupyl_queue/payloads.py)

    def body() -> IndexResult:
        # A failure for good (a bad URI, a model mismatch, retries spent) fails the job (on_failure).
        return ingest.expand_job(rt, job, dispatch)

    def dispatch(batch: EmbedRequest) -> None:
        # The task id is the batch id: the sweep (jobs.py) looks for it in the broker.
        embed.apply_async(kwargs=batch, task_id=jobs.batch_id(batch["job_id"], batch["batch"]))

    return riding_out_redis(self, kwargs, body)


def ask_nearest(collection: str, vectors: Any) -> list[tuple[int, float] | None]:
    """Near-duplicate lookup on the search workers, which hold the index (embed workers do not)."""
    result = nearest.apply_async(kwargs=queries.nearest_request(collection, vectors))
    answer = result.get(timeout=runtime().settings.search_timeout, disable_sync_subtasks=False)
    if answer.get("degraded"):
        keys = ", ".join(d["key"] for d in answer.get("damaged", []))
        log.warning("near-duplicate check in %s missed the vectors of damaged %s", collection, keys)
    return [None if row is None else (int(row[0]), float(row[1])) for row in answer["nearest"]]


def ask_short_lists(collection: str, vectors: Any, top: int) -> list[list[tuple[int, float]]]:
    """Each vector's ``top`` nearest indexed images (the copy-mode near-duplicate check)."""
    result = nearest.apply_async(kwargs=queries.nearest_request(collection, vectors, top))
    answer = result.get(timeout=runtime().settings.search_timeout, disable_sync_subtasks=False)
    if answer.get("degraded"):
        keys = ", ".join(d["key"] for d in answer.get("damaged", []))
        log.warning("copy check in %s missed the vectors of damaged %s", collection, keys)
    rows = answer.get("candidates") or [[hit] if hit else [] for hit in answer["nearest"]]
    return [[(int(image_id), float(distance)) for image_id, distance in row] for row in rows]


# ignore_result: an embed batch's outcome lives in its job (the summary in Redis, each item's in the
# store's batch report, docs/tasks.md); a copy in the result backend, items and all, was read by
# no one, cost a STARTED and a SUCCESS write per batch, and stayed in Redis for PUPYL_RESULT_EXPIRES
# (a day) at ~100-140 bytes an image (a 256-image report: 35 KB): 100+ MB per million images.
# Flower still shows each batch (from the worker's events).
@shared_task(name=C.TASK_EMBED, bind=True, ignore_result=True, **JOB_RETRY)
def embed(self: Any, **kwargs: Any) -> EmbedResult:
    rt = runtime()
    batch = cast(EmbedRequest, kwargs)

    def body() -> EmbedResult:
        # Any failure for good ends this batch only, its items failed with the reason (on_failure).
        result = cast(EmbedResult, embedding.embed_batch(rt, batch, ask_nearest, ask_short_lists))
        if embedding.compaction_due(rt, batch["collection"], result.get("sequence")):
            request: CompactRequest = {"collection": batch["collection"]}
            compact.apply_async(kwargs=request)
        return result

    return riding_out_redis(self, kwargs, body)


def to_shard(shard: int, request: ShardRequest) -> Any:
    return search_shard.apply_async(kwargs=request, queue=C.shard_queue(shard))


@shared_task(name=C.TASK_SEARCH, bind=True, **RETRY)
def search(self: Any, **kwargs: Any) -> SearchResult:
    request = cast(SearchRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: queries.search(runtime(), request, to_shard))


@shared_task(name=C.TASK_SEARCH_SHARD, bind=True, **RETRY)
def search_shard(self: Any, **kwargs: Any) -> ShardSearchResult | ShardVectorResult:
    request = cast(ShardRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: sharding.shard_search(runtime(), request))


@shared_task(name=C.TASK_NEAREST, bind=True, **RETRY)
def nearest(self: Any, **kwargs: Any) -> NearestResult:
    request = cast(NearestRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: queries.nearest(runtime(), request, to_shard))


@shared_task(name=C.TASK_SET_ATTRIBUTES, bind=True, **RETRY)
def set_attributes(self: Any, **kwargs: Any) -> SetAttributesResult:
    request = cast(SetAttributesRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: queries.set_attributes(runtime(), request, to_shard))


@shared_task(name=C.TASK_REMOVE, bind=True, **RETRY)
def remove(self: Any, **kwargs: Any) -> RemoveResult:
    request = cast(RemoveRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: queries.remove(runtime(), request))


@shared_task(name=C.TASK_COMPACT, bind=True, **RETRY)
def compact(self: Any, **kwargs: Any) -> dict[str, Any]:
    """The new snapshot's manifest (open-ended), or ``{"skipped": reason}``."""
    request = cast(CompactRequest, kwargs)
    return riding_out_redis(self, kwargs, lambda: queries.compact(runtime(), request))


@shared_task(name=C.TASK_COMPACT_ALL, **RETRY)
def compact_all() -> CompactAllResult:
    """Celery beat's periodic compaction: queue one per collection that has new commits."""
    rt = runtime()
    queued = []
    for name in list_collections(rt.store):
        coord = rt.coordinator(name)
        if coord.last_sequence() > coord.snapshot_watermark():
            request: CompactRequest = {"collection": name}
            compact.apply_async(kwargs=request)
            queued.append(name)
    return {"queued": queued}


@shared_task(name=C.TASK_SWEEP_JOBS, **RETRY)
def sweep_jobs() -> SweepJobsResult:
    """Celery beat's sweep: end the jobs whose tasks are all gone (pupyl_queue/jobs.py)."""
    rt = runtime()
    return {"ended": jobs.end_lost_jobs(rt.redis, rt.store, rt.settings.job_stall_s, ttl=rt.settings.job_ttl)}


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


@shared_task(name=C.TASK_HOUSEKEEP, **RETRY)
def housekeep() -> HousekeepResult:
    """Celery beat's housekeeping (pupyl_queue/housekeeping.py): ended jobs' records expire, cut-off
    uploads and leftovers of gone jobs are deleted, query images never searched too."""
    from pupyl_queue.housekeeping import housekeep as run

    rt = runtime()
    return cast(HousekeepResult, run(rt.store, rt.redis, rt.settings))
