"""Housekeeping: a bound on everything that used to grow for good.

- **Job records.** A job's Redis hash and its ``:batches`` expire ``PUPYL_JOB_TTL`` after the
  job ends (``Coordinator.expire_job``, called where a job ends); the sweep here gives one to any
  ended job that has none (ended before this, or by a path that missed the call). The per-item
  report stays in the store (``Job.report`` reads it from there once the record is gone).
- **``batch-ids``.** A collection's hash of (batch -> first id) keeps a field per batch ever run;
  the fields of jobs whose record is gone are dropped (their batches can no longer be delivered:
  ``PUPYL_JOB_TTL`` is at least the visibility timeout).
- **Query images** a client put in the store whose search never ran (no worker, the caller gave
  up): deleted ``PUPYL_QUERY_TTL`` after they were written.
- **Orphans**: what a batch that can never commit wrote (its job counted it failed) while the store
  was down, so it could not be deleted then (``pupyl:<c>:orphans``).
- **Uploads and staged bytes** (``uploads/<job>/``, ``staging/<job>/``) of jobs that ended, that no
  longer exist, or whose upload was cut off (an API killed mid-request): a job still ``uploading``
  ``PUPYL_UPLOAD_GRACE`` after it was recorded is failed with that reason and its bytes deleted.

Live work is never touched: a job still uploading within its grace, or queued, expanding or
running, keeps everything it has (jobs that died while running are ended by the dead-job sweep,
and their bytes go here afterwards). ``housekeep`` runs from Celery beat on the maintenance queue
(``pupyl.housekeep``) and may be called directly; every step is idempotent.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator, read_job
from pupyl_queue.layout import Layout
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectStore

log = logging.getLogger(__name__)

REPORT = (
    "jobs_expired",  # ended jobs the sweep gave a TTL (and stray job keys)
    "uploads_abandoned",  # jobs failed because their upload was cut off
    "job_folders_deleted",  # jobs whose uploads/staging were deleted
    "objects_deleted",  # objects under those folders
    "queries_deleted",  # query images never searched
    "batch_ids_forgotten",  # batch-ids fields of jobs whose record is gone
    "orphans_deleted",  # objects of batches that can never commit, left while the store was down
    "collections_skipped",  # collections whose Redis state is lost (left for `pupyl-queue rebuild`)
)
CUT_OFF = "the upload was cut off: not finished within PUPYL_UPLOAD_GRACE ({grace} s); upload the files again"
_BATCH_ID = re.compile(r"^(?P<job>.+)-\d{6}$")  # embedding.py: f"{job_id}-{batch:06d}"
_SCAN = 1000


def housekeep(
    store: ObjectStore, client: redis.Redis, settings: Settings, now: float | None = None
) -> dict[str, int]:
    """One round over Redis and every collection in the store; counts of what it removed."""
    now = time.time() if now is None else now
    counts: Counter[str] = Counter()
    counts.update(expire_ended_jobs(client, settings.job_ttl))
    for name in store.children(C.STORE_COLLECTIONS):
        if not C.COLLECTION_NAME.match(name):
            continue
        layout = Layout(name)
        counts.update(collect_queries(store, layout, settings.query_ttl, now))
        if redis_lost(store, client, layout):
            # Every running job looks gone now; `pupyl-queue rebuild` tells them apart by these very
            # folders (it marks their jobs interrupted), so they stay until Redis is rebuilt.
            log.warning("collection %s: Redis holds none of its state; run `pupyl-queue rebuild`", name)
            counts["collections_skipped"] += 1
            continue
        counts.update(collect_job_leftovers(store, client, layout, settings, now))
        counts.update(forget_batch_ids(client, layout))
        counts.update(delete_orphans(store, client, layout))
    report = {key: counts[key] for key in REPORT}
    if any(report.values()):
        log.info("housekeeping: %s", report)
    return report


def redis_lost(store: ObjectStore, client: redis.Redis, layout: Layout) -> bool:
    """Whether Redis lost this collection's state: the store holds commits, Redis no commit log."""
    if Coordinator(client, layout).last_sequence():
        return False
    return any(store.children(f"{layout.root}/{folder}") for folder in (C.STORE_SEGMENTS, C.STORE_SNAPSHOTS))


def abandon_upload(store: ObjectStore, coord: Coordinator, job_id: str, reason: str, ttl: int) -> int | None:
    """Fail a job still ``uploading`` and delete what it stored (how many objects); None when it had
    moved on meanwhile (its uploader finished first: the job is live and keeps its bytes)."""
    if not coord.update_job_if(job_id, "uploading", state="failed", error=reason, finished_at=time.time()):
        return None
    coord.expire_job(job_id, ttl)
    return store.delete_prefix(coord.layout.uploads(job_id) + "/")


def expire_ended_jobs(client: redis.Redis, ttl: int) -> Counter[str]:
    """Give every ended job without a TTL one (and stray job keys: ``:batches`` of a gone job, a hash
    recreated without a state by a late write after its job expired)."""
    counts: Counter[str] = Counter()
    keys = client.scan_iter(match=f"{C.REDIS_PREFIX}:{C.KEY_JOB}:*", count=_SCAN)
    pending: list[str] = []
    for key in keys:
        pending.append(key)
        if len(pending) >= _SCAN:
            counts.update(_expire_some(client, pending, ttl))
            pending = []
    counts.update(_expire_some(client, pending, ttl))
    return counts


def _expire_some(client: redis.Redis, keys: list[str], ttl: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    if not keys:
        return counts
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.ttl(key)
            if key.endswith(":batches"):
                pipe.exists(key.removesuffix(":batches"))
            else:
                pipe.hmget(key, "state", "ended_at", "retries")
        # A collection named "job" has its keys under this prefix too (pupyl:job:seq, a string):
        # those answer WRONGTYPE here and are left alone.
        answers = pipe.execute(raise_on_error=False)
    prefix = f"{C.REDIS_PREFIX}:{C.KEY_JOB}:"
    ended: list[str] = []
    for key, key_ttl, found in zip(keys, answers[::2], answers[1::2], strict=True):
        if isinstance(found, Exception) or isinstance(key_ttl, Exception):
            continue
        lasting = key_ttl == -1 and ttl > 0
        if key.endswith(":batches"):
            stray = lasting and not found  # its job's hash is gone
        else:
            state, ended_at, retries = found
            if state in C.JOB_ENDED and (ended_at is None or lasting):
                ended.append(key.removeprefix(prefix))
                continue
            # A retry counted after its job's record expired recreates a hash holding only that.
            stray = lasting and state is None and retries is not None
        if stray:
            client.expire(key, ttl)
            counts["jobs_expired"] += 1
    Coordinator(client, Layout()).expire_jobs(ended, ttl)  # job keys do not depend on the collection
    counts["jobs_expired"] += len(ended)
    return counts


def collect_queries(store: ObjectStore, layout: Layout, ttl: int, now: float) -> Counter[str]:
    """Delete query images older than ``ttl``: a search deletes its own, so these were never searched."""
    counts: Counter[str] = Counter()
    for key, modified in store.list_modified(layout.queries + "/"):
        if now - modified > ttl:
            store.delete(key)
            counts["queries_deleted"] += 1
    return counts


def collect_job_leftovers(
    store: ObjectStore, client: redis.Redis, layout: Layout, settings: Settings, now: float
) -> Counter[str]:
    """Delete ``uploads/<job>/`` and ``staging/<job>/`` of jobs that ended, are gone, or were cut off."""
    counts: Counter[str] = Counter()
    coord = Coordinator(client, layout)
    grace = settings.upload_grace
    folders = (f"{layout.root}/{C.STORE_UPLOADS}", f"{layout.root}/{C.STORE_STAGING}")
    job_ids = sorted({job_id for folder in folders for job_id in store.children(folder)})
    for job_id in job_ids:
        job = read_job(client, job_id)
        if not _leftover(store, coord, job_id, job, grace, now):
            continue
        if job is not None and job.get("state") == "uploading":
            deleted = abandon_upload(store, coord, job_id, CUT_OFF.format(grace=grace), settings.job_ttl)
            if deleted is None:
                continue
            counts["uploads_abandoned"] += 1
            counts["objects_deleted"] += deleted
            log.warning("job %s: %s", job_id, CUT_OFF.format(grace=grace))
        for prefix in (layout.uploads(job_id), layout.staging(job_id)):
            counts["objects_deleted"] += store.delete_prefix(prefix + "/")
        counts["job_folders_deleted"] += 1
    return counts


def _leftover(
    store: ObjectStore, coord: Coordinator, job_id: str, job: dict[str, Any] | None, grace: int, now: float
) -> bool:
    """Whether a job's uploads and staged bytes are no longer anyone's."""
    if job is None:
        # No record: an uploader of old (records came after the bytes), or a record long expired.
        # Its folders' newest object tells whether anything still writes there.
        layout = coord.layout
        times = [
            modified
            for prefix in (layout.uploads(job_id), layout.staging(job_id))
            for _key, modified in store.list_modified(prefix + "/")
        ]
        return not times or now - max(times) > grace
    state = job.get("state")
    if state == "uploading":
        return now - float(job.get("created_at") or 0) > grace
    if state in C.JOB_ENDED:
        ended = job.get("ended_at") or job.get("finished_at")
        # Batches of a failed job may still be queued: they keep their staged bytes for a while.
        return ended is not None and now - float(ended) > grace
    return False  # queued, expanding, running: live


def forget_batch_ids(client: redis.Redis, layout: Layout) -> Counter[str]:
    """Drop the ``batch-ids`` fields of jobs whose record is gone (expired or deleted)."""
    counts: Counter[str] = Counter()
    key = layout.key(C.KEY_BATCH_IDS)
    by_job: dict[str, list[str]] = {}
    for field, _first in client.hscan_iter(key, count=_SCAN):
        match = _BATCH_ID.match(field)
        if match:
            by_job.setdefault(match["job"], []).append(field)
    jobs = list(by_job)
    for start in range(0, len(jobs), _SCAN):
        chunk = jobs[start : start + _SCAN]
        with client.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.exists(layout.job_key(job_id))
            alive = pipe.execute()
        dead = [job_id for job_id, live in zip(chunk, alive, strict=True) if not live]
        gone = [field for job_id in dead for field in by_job[job_id]]
        if gone:
            client.hdel(key, *gone)
            counts["batch_ids_forgotten"] += len(gone)
    return counts


def delete_orphans(store: ObjectStore, client: redis.Redis, layout: Layout) -> Counter[str]:
    """Delete the objects named in ``pupyl:<c>:orphans`` (jobs.delete_or_leave_to_housekeeping).

    A key leaves the set only after its delete went through; a store still down raises here, and
    the set waits for the next round.
    """
    counts: Counter[str] = Counter()
    key = layout.key(C.KEY_ORPHANS)
    while orphans := client.srandmember(key, _SCAN):
        store.delete_many(orphans)
        client.srem(key, *orphans)
        counts["orphans_deleted"] += len(orphans)
    return counts
