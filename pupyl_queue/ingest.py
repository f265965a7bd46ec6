"""Bulk ingestion: expand a URI into staged batches, then embed and commit each batch.

``expand_job`` runs on the ingest queue; ``embed_batch`` on the embed queue.
Both may run twice after a redelivery: batch numbers, staged keys, ids and
segment keys are all derived from (job, batch), and each commit and job count
happens once (Lua scripts in coordination.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pupyl_queue.collection import ensure_collection
from pupyl_queue.images import DecodedImage, ImageError, decode
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import encode_segment
from pupyl_queue.sources import Sources, fetch_pending
from pupyl_queue.store import ObjectNotFound

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


def _decode_item(rt: Runtime, item: dict[str, Any]) -> DecodedImage | str:
    if item.get("error"):
        return item["error"]
    try:
        return decode(rt.store.get(item["key"]), rt.settings.max_pixels)
    except ImageError as exc:
        return str(exc)
    except ObjectNotFound:
        return "staged copy is missing (the batch was already committed or the store lost it)"


Nearest = Callable[[str, np.ndarray], list[tuple[int, float] | None]]


def embed_batch(rt: Runtime, task: dict[str, Any], nearest: Nearest | None = None) -> dict[str, Any]:
    """Decode, dedup, store, embed and commit one batch; each item ends indexed, duplicate or failed.

    ``nearest(collection, vectors)`` gives each vector's nearest indexed image;
    it is asked only when the task sets a near-duplicate distance.
    """
    job_id, batch, collection = task["job_id"], int(task["batch"]), task["collection"]
    coord = rt.coordinator(collection)
    layout = coord.layout
    done = coord.finished_batch(job_id, batch)
    if done is not None:
        return done
    items = task["items"]
    extractor = rt.extractor(collection)
    ids = coord.allocate_ids(f"{job_id}-{batch:06d}", len(items))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda it: _decode_item(rt, it), items))
    decode_s = time.perf_counter() - started

    report: list[dict[str, Any]] = []
    keep: list[int] = []  # positions of the items to embed
    for position, (image_id, item, result) in enumerate(zip(ids, items, decoded)):
        if isinstance(result, str):
            report.append({"ref": item["ref"], "status": "failed", "error": result})
            continue
        owner = coord.claim_hash(result.sha256, image_id)
        if task.get("check_unique") and owner != image_id:
            report.append({"ref": item["ref"], "status": "duplicate", "duplicate_of": owner})
            continue
        keep.append(position)
        report.append({"ref": item["ref"], "status": "indexed", "id": image_id})

    sequence = None
    embed_s = 0.0
    if keep:
        size = extractor.input_size
        pixels = np.stack([decoded[p].pixels(size) for p in keep])  # type: ignore[union-attr]
        started = time.perf_counter()
        vectors = extractor.embed(pixels)
        embed_s = time.perf_counter() - started
        threshold = float(task.get("near_duplicate") or 0.0)
        if threshold > 0:
            before = keep
            keep, vectors = _drop_near_duplicates(task, keep, vectors, ids, report, threshold, nearest)
            for p in set(before) - set(keep):  # not indexed: its content hash must not point at it
                coord.release_hash(decoded[p].sha256, ids[p])  # type: ignore[union-attr]
    if keep:
        for p in keep:
            image = decoded[p]
            assert isinstance(image, DecodedImage)
            rt.store.put(layout.image(ids[p]), image.normalized_bytes())
            meta = _metadata(ids[p], items[p], image)
            rt.store.put(layout.image_meta(ids[p]), json.dumps(meta).encode())
        segment = layout.segment(f"{job_id}-{batch:06d}")
        rt.store.put(segment, encode_segment(np.array([ids[p] for p in keep]), vectors))
        sequence = coord.publish(segment)

    counts = {s: sum(1 for r in report if r["status"] == s) for s in ("indexed", "duplicate", "failed")}
    summary = {
        "batch": batch,
        "sequence": sequence,
        **counts,
        "decode_s": round(decode_s, 4),
        "embed_s": round(embed_s, 4),
    }
    rt.store.put(layout.job_report(job_id, batch), json.dumps({**summary, "items": report}).encode())
    coord.finish_batch(job_id, batch, summary)
    for item in items:
        if item.get("key"):
            rt.store.delete(item["key"])
    finish_if_done(rt, job_id, collection)
    return {**summary, "items": report}


def _drop_near_duplicates(
    task: dict[str, Any],
    keep: list[int],
    vectors: np.ndarray,
    ids: list[int],
    report: list[dict[str, Any]],
    threshold: float,
    nearest: Nearest | None,
) -> tuple[list[int], np.ndarray]:
    """Mark items within ``threshold`` cosine distance of an indexed image, or of an earlier item."""
    if nearest is None:
        raise RuntimeError("near-duplicate detection needs a search worker (no nearest function given)")
    found = nearest(task["collection"], vectors)
    kept: list[int] = []
    for row, position in enumerate(keep):
        match = found[row]
        if kept:  # earlier items of this batch count as indexed
            sims = vectors[[keep.index(p) for p in kept]] @ vectors[row]
            best = int(np.argmax(sims))
            distance = max(0.0, 1.0 - float(sims[best]))
            if match is None or distance < match[1]:
                match = (ids[kept[best]], distance)
        if match is not None and match[1] <= threshold:
            decoded_sha = report[position]
            report[position] = {
                "ref": decoded_sha["ref"],
                "status": "duplicate",
                "duplicate_of": match[0],
                "distance": round(match[1], 6),
            }
            continue
        kept.append(position)
    rows = [keep.index(p) for p in kept]
    return kept, vectors[rows]


def _metadata(image_id: int, item: dict[str, Any], image: DecodedImage) -> dict[str, Any]:
    meta = {
        "id": image_id,
        "original_file_name": item["ref"].rsplit("/", 1)[-1],
        "original_path": item["ref"],
        "original_file_size": image.size_bytes,
        "original_access_time": None,
    }
    meta.update(item.get("meta") or {})
    meta.update(
        {
            "ref": item["ref"],
            "sha256": image.sha256,
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "frames": image.frames,
            "indexed_at": time.time(),
        }
    )
    return meta
