"""How a bulk job ends: every job reaches ``done``, ``partial`` or ``failed``, and says why.

A batch whose task fails for good (a transient error that outlasted its retries, or a bug) is
counted like a finished one, each of its items ``failed`` with the reason, and its dedup claims
released (workers/tasks.py ``JobTask.on_failure``). A task can also vanish without that handler
running (its worker and Redis went down together, a queue purged by hand): ``end_lost_jobs``
finds the jobs that made no progress for PUPYL_JOB_STALL_S while no task of theirs is queued,
held by a worker or waiting for a retry, and ends them the same way. Celery beat runs it
(``pupyl.sweep_jobs``); ``Job.wait`` runs it for its own job, so a wait never outlives its job.

Only Redis and the store are used here (no Celery, no TensorFlow): producers call it too. Redis
is written first, the store after and best effort: the store may be the part that is down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator, recent_jobs
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectStore, StoreUnavailable

log = logging.getLogger(__name__)

UNACKED = "unacked"  # kombu's Redis transport: HASH delivery tag -> [message, exchange, routing key]
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + sep + priority is a queue's other list
JOB_QUEUES = (C.QUEUE_INGEST, C.QUEUE_EMBED)
SCAN_PAGE = 200
# The store, or how to open it: a producer's client opens its store on first use, and opening an
# S3 store that is down fails. Everything here must work without it (Redis first, store best effort).
StoreLike = ObjectStore | Callable[[], ObjectStore]


def _open(store: StoreLike) -> ObjectStore:
    return store() if callable(store) else store


def batch_id(job_id: str, batch: int) -> str:
    """A batch's id: its ids, segment and embed task id are all derived from it."""
    return f"{job_id}-{int(batch):06d}"


def fail_batch(client: redis.Redis, store: StoreLike, task: dict[str, Any], reason: str, *, ttl: int) -> bool:
    """Count an embed batch that failed for good: each item ``failed`` with ``reason``, claims released.

    False when the batch was already counted (it finished, or failed before). A batch that was
    committed before it failed (its report or clean-up failed) is counted as committed, without
    per-item outcomes: its images are searchable, so calling them failed would be wrong.

    Counted failed, the batch can no longer commit (a live delivery's commit is refused from then
    on: coordination._PUBLISH), so what its runs wrote under its ids goes: stored copies,
    originals, local features, its metadata object and an uncommitted segment.
    """
    job_id, number, collection = task["job_id"], int(task["batch"]), task["collection"]
    coord = Coordinator(client, Layout(collection))
    bid = batch_id(job_id, number)
    counted = None
    while counted is None:  # at most twice: a live delivery may commit between the look and the count
        if coord.finished_batch(job_id, number) is not None:
            return False
        counted = _count_failed(coord, task, reason)
    summary, items = counted
    if summary["sequence"] is None:
        orphans = coord.layout.batch_objects(bid, coord.batch_ids(bid, len(task["items"])))
        delete_or_leave_to_housekeeping(client, store, coord.layout, orphans)
    log.warning("job %s: batch %d failed for good: %s", job_id, number, summary["error"])
    _best_effort(lambda: _store_batch_report(store, coord.layout, job_id, summary, items), "its report")
    for item in task["items"]:
        if item.get("key"):
            _best_effort(lambda key=item["key"]: _open(store).delete(key), item["key"])
    end_if_done(client, store, job_id, collection, ttl=ttl)
    return True


def _count_failed(
    coord: Coordinator, task: dict[str, Any], reason: str
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Count the batch into its job as failed (or as committed, if it was): its summary and items.

    None when nothing was counted: the batch was counted meanwhile, or committed between the look
    and the count (the count checks in the same script: Coordinator.finish_batch).
    """
    job_id, number = task["job_id"], int(task["batch"])
    bid = batch_id(job_id, number)
    segment = coord.layout.segment(bid)
    sequence = coord.r.hget(coord.layout.key(C.KEY_COMMIT_BY_OBJECT), segment)
    summary: dict[str, Any] = {"batch": number, "indexed": 0, "duplicate": 0}
    if sequence is None:
        items = [{"ref": item.get("ref"), "status": "failed", "error": reason} for item in task["items"]]
        summary.update(sequence=None, failed=len(items), error=reason)
        # The items go into Redis too (a batch's worth): the store may be what failed, and
        # Job.report reads both.
        if not coord.finish_batch(job_id, number, {**summary, "items": items}, unless_committed=segment):
            return None
        coord.settle_claims(bid, failed=True)
        return summary, items
    error = f"committed as sequence {int(sequence)}, then failed (its report is lost): {reason}"
    summary.update(sequence=int(sequence), failed=0, error=error)
    if not coord.finish_batch(job_id, number, {**summary, "items": []}):
        return None
    coord.settle_claims(bid)
    return summary, []


def fail_job(
    client: redis.Redis, store: StoreLike, job_id: str, collection: str, reason: str, *, ttl: int
) -> None:
    """The job as a whole failed (its expansion): ``failed`` with ``error``, unless it already ended."""
    coord = Coordinator(client, Layout(collection))
    key = coord.layout.job_key(job_id)
    if client.hget(key, "state") in C.JOB_ENDED:
        return
    if client.hsetnx(key, "finished_at", time.time()):
        coord.update_job(job_id, state="failed", error=reason)
        coord.expire_job(job_id, ttl)  # the record goes PUPYL_JOB_TTL from now
        log.warning("job %s failed: %s", job_id, reason)
        # Its staged bytes stay: batches it dispatched may still be queued. Housekeeping deletes
        # them PUPYL_UPLOAD_GRACE after the job ended (pupyl_queue/housekeeping.py).


def end_if_done(
    client: redis.Redis, store: StoreLike, job_id: str, collection: str, *, ttl: int
) -> str | None:
    """Once every batch is counted: ``done``, ``partial`` (some batches failed) or ``failed`` (all did)."""
    coord = Coordinator(client, Layout(collection))
    key = coord.layout.job_key(job_id)
    expanded, total, done, failed, state = client.hmget(
        key, "expanded", "batches_total", "batches_done", "batches_failed", "state"
    )
    if expanded != "1" or int(total or 0) != int(done or 0) or state in C.JOB_ENDED:
        return None
    if not client.hsetnx(key, "finished_at", time.time()):
        return None
    failed_batches = int(failed or 0)
    if not failed_batches:
        end, fields = "done", {}
    else:
        end = "failed" if failed_batches == int(total or 0) else "partial"
        fields = {
            "error": f"{failed_batches} of {int(total or 0)} batches failed: {_last_error(client, key)}"
        }
    coord.update_job(job_id, state=end, **fields)
    coord.expire_job(job_id, ttl)  # the record goes PUPYL_JOB_TTL from now
    # Every batch is counted: nothing reads the job's uploads or staged bytes any more.
    for prefix in (coord.layout.uploads(job_id) + "/", coord.layout.staging(job_id) + "/"):
        _best_effort(lambda p=prefix: _open(store).delete_prefix(p), prefix)
    return end


def _last_error(client: redis.Redis, key: str) -> str:
    for raw in client.hvals(key + ":batches"):
        error = json.loads(raw).get("error")
        if error:
            return str(error)
    return "unknown"


def _store_batch_report(
    store: StoreLike, layout: Layout, job_id: str, summary: dict[str, Any], items: list[dict[str, Any]]
) -> None:
    _open(store).put(
        layout.job_report(job_id, summary["batch"]), json.dumps({**summary, "items": items}).encode()
    )


def _best_effort(action: Any, what: str) -> bool:
    """A store write or delete that may fail: the store may be what failed. Redis has the truth;
    housekeeping deletes an ended job's leftovers once the store answers again. False if it failed."""
    try:
        action()
    except StoreUnavailable as exc:
        log.warning("store unreachable (%s): %s left for housekeeping", exc, what)
        return False
    return True


def delete_or_leave_to_housekeeping(
    client: redis.Redis, store: StoreLike, layout: Layout, keys: list[str]
) -> None:
    """Delete what a batch that can never commit wrote; with the store down, name it in Redis instead.

    Its objects live under image ids no segment will ever hold, so nothing else would find them
    again: housekeeping deletes the keys of ``pupyl:<c>:orphans`` once the store answers.
    """
    if keys and not _best_effort(lambda: _open(store).delete_many(keys), "what its runs wrote"):
        client.sadd(layout.key(C.KEY_ORPHANS), *keys)


# --- jobs whose tasks are gone
def tasks_in_broker(client: redis.Redis, wanted: set[str]) -> set[str]:
    """Task ids of ``wanted`` that still exist (running, held for a retry, or queued); empty when none.

    Held and running tasks are in kombu's ``unacked`` hash (late acks; a dead worker's stay there
    until workers/liveness.py restores them); queued ones in the ingest and embed lists, read from
    the consuming end in pages, and only until one is found: one is enough to keep a job alive.
    """
    found: set[str] = set()
    for raw in client.hvals(UNACKED):
        found |= {_task_id(raw, unacked=True)} & wanted
    for queue in JOB_QUEUES:
        for name in [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9))]:
            end = client.llen(name)
            while end > 0 and not found:
                page = client.lrange(name, max(0, end - SCAN_PAGE), end - 1)
                found |= {_task_id(raw) for raw in page} & wanted
                end -= SCAN_PAGE
    return found


def _task_id(raw: str, unacked: bool = False) -> str:
    try:
        message = json.loads(raw)
        return str((message[0] if unacked else message)["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def end_if_lost(
    client: redis.Redis, store: StoreLike, job_id: str, stall_s: float, *, ttl: int, recheck_s: float = 1.0
) -> str | None:
    """End a job that made no progress for ``stall_s`` and has no task left anywhere; its new state.

    Unfinished batches are failed with the reason; a job lost before its expansion ended fails.
    Two looks at the broker, ``recheck_s`` apart: a message moves from its queue to ``unacked``
    in two steps, and must not be missed between them.
    """
    key = f"{C.REDIS_PREFIX}:{C.KEY_JOB}:{job_id}"
    fields = ("state", "collection", "expanded", "batches_total", "total", "created_at", "updated_at")
    state, collection, expanded, batches, total, *times = client.hmget(key, fields)
    if state is None or state in C.JOB_ENDED or state == "uploading" or not collection:
        return None  # an upload cut off is housekeeping's (pupyl_queue/housekeeping.py)
    if time.time() - max(float(t or 0) for t in times) < stall_s:
        return None
    finished = {int(b) for b in client.hkeys(key + ":batches")}
    open_batches = [n for n in range(int(batches or 0)) if n not in finished]
    # The expansion's task id is the job id; each batch's, its batch id. A redelivered expansion
    # may still be running while its batches are done: it counts too.
    wanted = {batch_id(job_id, n) for n in open_batches} | {job_id}
    if tasks_in_broker(client, wanted):
        return None
    time.sleep(recheck_s)
    if tasks_in_broker(client, wanted):
        return None
    reason = f"its task was lost: not queued, not held by any worker, no progress for {stall_s:.0f}s"
    if expanded != "1":
        fail_job(client, store, job_id, collection, f"the expansion of {job_id} stopped; {reason}", ttl=ttl)
        return client.hget(key, "state")
    sizes = batch_sizes(int(total or 0), int(batches or 0), _batch_size(client, key))
    for number in open_batches:
        count = sizes[number] if number < len(sizes) else 0
        first = sum(sizes[:number])
        # The refs travelled in the lost message only: each item is named by its place in the job.
        items = [{"ref": f"item {first + i} of job {job_id}"} for i in range(count)]
        task = {"job_id": job_id, "collection": collection, "batch": number, "items": items}
        fail_batch(client, store, task, reason, ttl=ttl)
    return end_if_done(client, store, job_id, collection, ttl=ttl) or client.hget(key, "state")


def _batch_size(client: redis.Redis, key: str) -> int:
    return int(client.hget(key, "batch_size") or 64)


def batch_target(number: int, size: int) -> int:
    """Batch sizes ramp up (size/8, size/4, size/2, size, ...) so the embed workers start early."""
    return max(1, size >> max(0, 3 - number))


def batch_sizes(total: int, batches: int, size: int) -> list[int]:
    """Items per batch of an expanded job (expand_job fills each to batch_target; the last takes the rest)."""
    sizes = []
    left = total
    for number in range(batches):
        count = min(left, batch_target(number, size))
        if number == batches - 1:
            count = left
        sizes.append(count)
        left -= count
    return sizes


def end_lost_jobs(client: redis.Redis, store: StoreLike, stall_s: float, *, ttl: int) -> dict[str, str]:
    """The beat sweep: end every recent job whose tasks are gone; job id -> its new state."""
    ended = {}
    for job in recent_jobs(client, C.RECENT_JOBS_KEPT):
        if job.get("state") not in C.JOB_ENDED:
            end = end_if_lost(client, store, job["job_id"], stall_s, ttl=ttl)
            if end:
                ended[job["job_id"]] = end
    return ended
