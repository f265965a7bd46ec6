"""Bulk ingestion: expand a URI into staged batches, then embed and commit each batch.

``expand_job`` runs on the ingest queue; ``embed_batch`` on the embed queue.
Both may run twice after a redelivery: batch numbers, staged keys, ids and
segment keys are all derived from (job, batch), and each commit and job count
happens once (Lua scripts in coordination.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pupyl_queue.collection import ensure_collection
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.sources import Sources, fetch_pending

log = logging.getLogger(__name__)

Dispatch = Callable[[dict[str, Any]], None]
FETCH_WINDOW = 64  # URLs fetched concurrently per window while expanding


def expand_job(rt: Runtime, job: dict[str, Any], dispatch: Dispatch) -> dict[str, Any]:
    """Stage every image the URI names into the store and dispatch one embed task per batch."""
    collection = job["collection"]
    layout = Layout(collection)
    coord = rt.coordinator(collection)
    job_id = job["job_id"]
    coord.update_job(job_id, state="expanding", started_at=time.time())
    ensure_collection(rt.store, rt.redis, layout, job)
    batch: list[dict[str, Any]] = []
    batches = total = 0

    def flush() -> None:
        nonlocal batch, batches
        if batch:
            dispatch(
                {
                    "job_id": job_id,
                    "collection": collection,
                    "batch": batches,
                    "items": batch,
                    "check_unique": bool(job.get("check_unique")),
                    "near_duplicate": float(job.get("near_duplicate") or 0.0),
                }
            )
            batches += 1
            batch = []

    sources = Sources(rt.settings, origin=job.get("origin") or "network")
    items = fetch_pending(
        sources.expand(job["uri"]), sources.fetcher, rt.settings.max_image_bytes, FETCH_WINDOW
    )
    for item in items:
        entry: dict[str, Any] = {"ref": item.ref, "meta": item.meta}
        if item.error:
            entry["error"] = item.error
        else:
            entry["key"] = layout.staged_item(job_id, total)
            rt.store.put(entry["key"], item.data or b"")
        batch.append(entry)
        total += 1
        if len(batch) >= rt.settings.batch_size:
            flush()
            coord.update_job(job_id, total=total)  # progress while expanding
    flush()
    coord.update_job(job_id, total=total, batches_total=batches, expanded=1, state="running")
    finish_if_done(rt, job_id, collection)
    return {"job_id": job_id, "total": total, "batches": batches}


def finish_if_done(rt: Runtime, job_id: str, collection: str) -> None:
    coord = rt.coordinator(collection)
    key = coord.layout.job_key(job_id)
    expanded, total, done = rt.redis.hmget(key, "expanded", "batches_total", "batches_done")
    complete = expanded == "1" and int(total or 0) == int(done or 0)
    if complete and rt.redis.hsetnx(key, "finished_at", time.time()):
        coord.update_job(job_id, state="done")
