"""Bulk ingestion: expand a URI into staged batches, then embed and commit each batch.

``expand_job`` runs on the ingest queue; ``embed_batch`` on the embed queue.
Both may run twice after a redelivery: batch numbers, staged keys, ids and
segment keys are all derived from (job, batch), and each commit and job count
happens once (Lua scripts in coordination.py).
"""

from __future__ import annotations

import base64
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from pupyl_queue import constants as C
from pupyl_queue import jobs
from pupyl_queue.collection import ensure_collection
from pupyl_queue.layout import Layout
from pupyl_queue.payloads import EmbedItem, EmbedRequest, IndexRequest, IndexResult
from pupyl_queue.runtime import Runtime
from pupyl_queue.sources import SourceError, SourceItem, Sources, fetch_pending, too_large
from pupyl_queue.store import OverlappedWrites

log = logging.getLogger(__name__)

Dispatch = Callable[[EmbedRequest], None]
FETCH_WINDOW = 64  # URLs fetched concurrently per window while expanding
STAGED_IN_FLIGHT = 16  # staged copies being written to a remote store at once while expanding


def expand_job(rt: Runtime, job: IndexRequest, dispatch: Dispatch) -> IndexResult:
    """Stage every image the URI names into the store and dispatch one embed task per batch."""
    collection = job["collection"]
    layout = Layout(collection)
    coord = rt.coordinator(collection)
    job_id = job["job_id"]  # the task gives it its own id when the sender left it out
    done = rt.redis.hmget(layout.job_key(job_id), "expanded", "total", "batches_total", "state")
    if done[0] == "1" or done[3] in C.JOB_ENDED:
        # Expanded already: this is a redelivery (its first run's ack was lost, e.g. Redis restarted
        # meanwhile). Expanding again would reset a finished job to "expanding" for good.
        finish_if_done(rt, job_id, collection)
        return {"job_id": job_id, "total": int(done[1] or 0), "batches": int(done[2] or 0)}
    coord.update_job(job_id, state="expanding", started_at=time.time(), batch_size=rt.settings.batch_size)
    spec = ensure_collection(rt.store, rt.redis, layout, job)
    batch: list[EmbedItem] = []
    batches = total = 0
    inline_budget = rt.settings.inline_batch_bytes
    # Staged copies to a remote store go through this process's threads while the expansion goes
    # on: one after another, each put to S3 waited on the server before the next image was read.
    staging = OverlappedWrites(rt.store, rt.pool, bound=STAGED_IN_FLIGHT)

    def flush() -> None:
        nonlocal batch, batches, inline_budget
        if batch:
            staging.wait()  # a batch is sent once every copy it names is in the store
            dispatch(embed_request(job, batches, batch))
            batches += 1
            batch = []
            inline_budget = rt.settings.inline_batch_bytes

    items: Iterable[SourceItem]
    # int8's first job keeps its first images' bytes as the calibration set: no references then.
    calibrating = spec.precision == "int8" and not rt.store.children(layout.calibration)
    if job["uri"].startswith(C.UPLOAD_SCHEME):
        items = _uploads(rt, layout, job_id, job["uri"], job.get("uploads"), by_key=not calibrating)
    else:
        references = rt.settings.local_references and not calibrating
        sources = Sources(
            rt.settings,
            origin=job.get("origin") or "network",
            references=references,
            s3_references=rt.settings.s3_references and not calibrating,
        )
        if job["uri"].startswith(C.ITEMS_SCHEME):  # the request lists its images, keys and attributes
            if job["uri"] != C.ITEMS_SCHEME + job_id or not isinstance(job.get("items"), list):
                raise SourceError(f"an {C.ITEMS_SCHEME} job lists its images in 'items' (uri items:<its id>)")
            listed = sources.listed(job["items"])
        else:
            listed = sources.expand(job["uri"])
        items = fetch_pending(listed, sources.fetcher, rt.settings.max_image_bytes, FETCH_WINDOW)
    if calibrating:
        items = _keep_calibration_sample(rt, layout, items)
    for item in items:
        entry: dict[str, Any] = {"ref": item.ref, "meta": item.meta, **_keyed(job, item, total)}
        data = item.data or b""
        if item.error:
            entry["error"] = item.error
        elif total and job.get("key") is not None:
            entry["error"] = (
                f"the job gives one key ({str(job['key'])[:80]!r}) for one image; its URI names more"
            )
        elif (reference := item.reference())[0]:  # read by the embed worker: nothing staged here
            entry[reference[0]] = reference[1]
        elif len(data) <= min(rt.settings.inline_item_bytes, inline_budget):
            entry["data_b64"] = base64.b64encode(data).decode()  # small: in the message itself
            inline_budget -= len(data)
        else:
            entry["key"] = layout.staged_item(job_id, total)  # large: through the store
            staging.submit(rt.store.put, entry["key"], data)
        batch.append(cast(EmbedItem, entry))  # one of data_b64, key, path, s3, upload or error
        total += 1
        if len(batch) >= jobs.batch_target(batches, rt.settings.batch_size):
            flush()
            coord.update_job(job_id, total=total, batches_total=batches)  # progress while expanding
    flush()
    coord.update_job(job_id, total=total, batches_total=batches, expanded=1, state="running")
    finish_if_done(rt, job_id, collection)
    return {"job_id": job_id, "total": total, "batches": batches}


def embed_request(job: IndexRequest, number: int, items: list[EmbedItem]) -> EmbedRequest:
    """The ``pupyl.embed`` kwargs of batch ``number`` of a job (docs/tasks.md)."""
    return {
        "job_id": job["job_id"],
        "collection": job["collection"],
        "batch": number,
        "items": items,
        "check_unique": bool(job.get("check_unique")),
        "origin": job.get("origin") or "network",
        "near_duplicate": float(job.get("near_duplicate") or 0.0),
    }


def _keyed(job: IndexRequest, item: SourceItem, number: int) -> dict[str, Any]:
    """The caller's key and attributes an item carries into its embed task (checked there, per item).

    A list gives them per line; a job may give one key (and attributes) for the one image it
    names (``PupylQueue.upsert``). ``image_key``: the embed item's ``key`` is its staged copy.
    """
    out: dict[str, Any] = {}
    key, attributes = item.key or None, item.attributes
    if number == 0 and job.get("key") is not None:
        key, attributes = job["key"], job.get("attributes")
    if key is not None:
        out["image_key"] = key
    if attributes:
        out["attributes"] = attributes
    return out


def _uploads(
    rt: Runtime, layout: Layout, job_id: str, uri: str, keyed: list[Any] | None = None, by_key: bool = True
) -> Iterator[SourceItem]:
    """The images a client uploaded for this job (the API puts them in the store first).

    A job may only read its own uploads: ``upload:<its own id>``. ``keyed`` (the request's
    ``uploads``) gives file number n its ``{"key", "attributes"}``, or ``{"error"}``: the reason the
    API refused them, which fails that file alone.

    ``by_key``: each upload goes to the embed worker as its store key, which it reads itself. The
    uploads stay until the job ends (jobs.end_if_done), unlike staged copies (deleted after their
    batch): an expansion run again lists the same uploads and numbers the same batches. Read here
    and sent again (inline, or staged: a GET and a PUT more per image) only for the bytes an int8
    calibration keeps.
    """
    if uri != C.UPLOAD_SCHEME + job_id:
        raise SourceError(f"{uri!r}: a job can only index its own uploads ({C.UPLOAD_SCHEME}{job_id})")
    for key, size in rt.store.sizes(layout.uploads(job_id) + "/"):
        name = key.rsplit("/", 1)[-1].split("-", 1)[-1]
        meta = {
            "original_file_name": name,
            "original_path": "upload",
            "original_file_size": size,
            "original_access_time": None,
        }
        number = int(key.rsplit("/", 1)[-1].split("-", 1)[0])
        given = keyed[number] if keyed and number < len(keyed) and isinstance(keyed[number], dict) else {}
        extra = {"key": str(given.get("key") or ""), "attributes": given.get("attributes") or {}}
        if given.get("error"):
            yield SourceItem(ref=name, error=str(given["error"]), meta=meta, **extra)
        elif size > rt.settings.max_image_bytes:
            yield SourceItem(ref=name, error=too_large(size, rt.settings.max_image_bytes), meta=meta, **extra)
        elif by_key:
            yield SourceItem(ref=name, meta=meta, upload=key, **extra)
        else:
            yield SourceItem(ref=name, data=rt.store.get(key), meta=meta, **extra)


def _keep_calibration_sample(
    rt: Runtime, layout: Layout, items: Iterable[SourceItem]
) -> Iterator[SourceItem]:
    """Save the job's first images as the collection's int8 calibration set, before any batch runs."""
    from pupyl_queue.int8 import CALIBRATION_IMAGES

    head: list[SourceItem] = []
    rest = iter(items)
    for item in rest:
        head.append(item)
        if sum(1 for i in head if i.data) >= CALIBRATION_IMAGES:
            break
    for number, item in enumerate(i for i in head if i.data):
        rt.store.put(f"{layout.calibration}/{number:03d}", item.data or b"")
    return itertools.chain(head, rest)


def finish_if_done(rt: Runtime, job_id: str, collection: str) -> None:
    """Once every batch is counted, the job ends: done, partial or failed (pupyl_queue/jobs.py)."""
    jobs.end_if_done(rt.redis, rt.store, job_id, collection, ttl=rt.settings.job_ttl)
