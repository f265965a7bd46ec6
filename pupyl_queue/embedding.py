"""The embed stage: one batch in, one committed segment out, at the machine's limit.

Inside a task the work is a pipeline. A thread pool (PUPYL_DECODE_THREADS)
fetches the staged bytes and hands them to the decode processes
(PUPYL_DECODE_PROCESSES, pupyl_queue/decode_pool.py), which decode, hash, resize
to the network's input and encode the normalized copy, and put the pixels in
the batch's shared memory; as soon as the first ``infer_batch`` images are ready
the network runs on them, compiled, while the processes keep decoding the rest.
Store writes run on the thread pool. With PUPYL_DECODE_PROCESSES=0 the threads
decode themselves (Pillow releases the GIL for most of it).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from pupyl_queue import integrity, keys, metadata
from pupyl_queue.attributes import InvalidAttribute, builtin_values, check_attributes, check_key
from pupyl_queue.codecs import SegmentRows, encode_segment
from pupyl_queue.coordination import BatchCounted
from pupyl_queue.decode_pool import Copies, DecodePool, Decoding, NoRoomForPixels, PixelSlots, Source
from pupyl_queue.images import ImageError, ImageInfo, decode
from pupyl_queue.ingest import finish_if_done
from pupyl_queue.jobs import batch_id, delete_or_leave_to_housekeeping
from pupyl_queue.runtime import Runtime
from pupyl_queue.sources import LocalRefused, Sources
from pupyl_queue.store import ObjectNotFound
from pupyl_queue.write_claim import write_once

log = logging.getLogger(__name__)

Nearest = Callable[[str, np.ndarray], list[tuple[int, float] | None]]
ShortLists = Callable[[str, np.ndarray, int], list[list[tuple[int, float]]]]


@dataclass
class Prepared:
    """One item after the decode stage: pixels for the network and the normalized copy, or an error."""

    image: ImageInfo | None = None
    pixels: np.ndarray | None = None
    normalized: bytes = b""
    error: str = ""
    original: bytes = b""  # the file as uploaded, with PUPYL_KEEP_ORIGINALS
    stored: bool = False  # its decode process wrote its stored copy (and original): nothing left to write


def _fetch(rt: Runtime, item: dict[str, Any], origin: str) -> bytes:
    """One item's bytes: inline in the message, a local path (PUPYL_LOCAL_REFERENCES: the same gate
    it passed at expansion, as the file may have changed since), an s3:// object
    (PUPYL_S3_REFERENCES), a job's upload or its staged copy in the store."""
    if "data_b64" in item:
        return base64.b64decode(item["data_b64"])
    if "path" in item or "s3" in item:
        return Sources(rt.settings, origin=origin).read_reference(item.get("path") or item["s3"])
    return rt.store.get(item["upload"] if "upload" in item else item["key"])


def _refused(item: dict[str, Any]) -> str:
    """Why the item fails before its bytes are read (an ingest error, a bad key or attributes), or ""."""
    if item.get("error"):
        return str(item["error"])
    try:
        if item.get("image_key") is not None:
            check_key(item["image_key"])
        check_attributes(item.get("attributes"))
    except InvalidAttribute as exc:
        return str(exc)
    return ""


def _unreadable(exc: Exception) -> Prepared:
    if isinstance(exc, ObjectNotFound):
        return Prepared(
            error="its bytes are missing from the store (the batch was already committed, its job "
            "ended, or the store lost them)"
        )
    return Prepared(error=str(exc))


READ_ERRORS = (ImageError, LocalRefused, ObjectNotFound)


def prepare(rt: Runtime, item: dict[str, Any], size: int, origin: str = "network") -> Prepared:
    """Fetch and decode one item in this process (a thread: Pillow releases the GIL for most of it)."""
    if error := _refused(item):
        return Prepared(error=error)
    try:
        data = _fetch(rt, item, origin)
        image = decode(data, rt.settings.max_pixels, target=size)
    except READ_ERRORS as exc:
        return _unreadable(exc)
    original = data if rt.settings.keep_originals else b""
    return Prepared(image.info(), image.pixels(size), image.normalized_bytes(), original=original)


GROUP_MAX = 8  # images per hand-off to a decode process (decode_pool.DecodePool.submit)


@dataclass
class _Handed:
    """Items of a batch handed to one decode process together, and those that failed before it."""

    failed: dict[int, Prepared]  # position -> its failure (refused, or its bytes unreadable)
    decoding: Decoding | None
    outcome: dict[int, Prepared] | None = None


CopyKeys = Callable[[int], tuple[str, str]]  # position -> its stored copy's key, its original's ("": none)


def hand_over(
    rt: Runtime,
    decoder: DecodePool,
    items: list[tuple[int, dict[str, Any]]],
    slots: PixelSlots,
    origin: str,
    copy_keys: CopyKeys | None = None,
) -> _Handed:
    """Fetch these items' (position, item) bytes and hand them to one decode process without waiting.

    With ``copy_keys`` the decode process writes each decoded image's stored copy under its keys,
    and reads a local path or an s3:// object itself (decode_pool.Copies): this process never holds
    those bytes.
    """
    failed: dict[int, Prepared] = {}
    images: list[tuple[Source, int]] = []
    for position, item in items:
        if error := _refused(item):
            failed[position] = Prepared(error=error)
            continue
        try:
            reference = item.get("path") or item.get("s3")
            source = reference if copy_keys and reference else _fetch(rt, item, origin)
            images.append((source, position))  # the slot is the position
        except READ_ERRORS as exc:
            failed[position] = _unreadable(exc)
    copies = Copies(rt.settings, origin, [copy_keys(p) for _, p in images]) if copy_keys else None
    decoding = decoder.submit(images, rt.settings.max_pixels, slots, copies) if images else None
    return _Handed(failed, decoding)


def collect(rt: Runtime, decoder: DecodePool, handed: _Handed) -> dict[int, Prepared]:
    """The decode processes' answers for handed-over items, by position (waits for them once)."""
    if handed.outcome is None:
        outcome = dict(handed.failed)
        if handed.decoding is not None:
            answers = decoder.results(handed.decoding)
            for (data, position), answer in zip(handed.decoding.images, answers):
                if isinstance(answer, ImageError):
                    outcome[position] = Prepared(error=str(answer))
                    continue
                info, normalized, pixels = answer
                if handed.decoding.copies is not None:  # written by the decode process
                    outcome[position] = Prepared(info, pixels, stored=True)
                    continue
                original = data if rt.settings.keep_originals else b""
                outcome[position] = Prepared(info, pixels, normalized or data, original=original)  # type: ignore[arg-type]
        handed.outcome = outcome
    return handed.outcome


@dataclass
class Timings:
    wait_s: float = 0.0  # inference waiting for decoded images
    infer_s: float = 0.0
    write_s: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def embed_batch(
    rt: Runtime, task: dict[str, Any], nearest: Nearest | None = None, short_lists: ShortLists | None = None
) -> dict[str, Any]:
    """Decode, dedup, store, embed and commit one batch; each item ends indexed, duplicate or failed.

    ``nearest(collection, vectors)`` gives each vector's nearest indexed image;
    it is asked only when the task sets a near-duplicate distance. With
    PUPYL_NEAR_DUPLICATE_MODE=copy, ``short_lists(collection, vectors, k)`` gives
    each vector's k nearest instead, verified here (pupyl_queue/copysearch.py).
    """
    job_id, batch, collection = task["job_id"], int(task["batch"]), task["collection"]
    coord = rt.coordinator(collection)
    layout = coord.layout
    done = coord.finished_batch(job_id, batch)
    if done is not None:
        # Done already; but an expansion run again (its first run cut off, e.g. by a Redis restart)
        # staged this batch's bytes once more: delete them, or they stay in the store for good.
        rt.store.delete_many(item["key"] for item in task["items"] if item.get("key"))
        return done
    items = task["items"]
    owner = batch_id(job_id, batch)
    ids = coord.allocate_ids(owner, len(items))
    run = _BatchRun(rt, task, ids)
    run.embed()
    threshold = float(task.get("near_duplicate") or 0.0)
    if run.keep and threshold > 0:
        before = run.keep
        if rt.settings.near_duplicate_mode == "copy":
            run.keep, run.vectors = _drop_copies(rt, task, run, ids, short_lists)
        else:
            run.keep, run.vectors = _drop_near_duplicates(
                task, run.keep, run.vectors, ids, run.report, threshold, nearest
            )
        if (done := coord.finished_batch(job_id, batch)) is not None:
            return done  # finished by another delivery meanwhile: see below
        for p in set(before) - set(run.keep):  # not indexed: its content hash must not point at it
            coord.release_hash(run.prepared[p].image.sha256, ids[p])  # type: ignore[union-attr]
    try:
        sequence = run.commit(owner) if run.keep else None
    except BatchCounted:
        # Its job counted this batch already (failed for good while this delivery ran): nothing
        # was committed, and nothing ever will be. What this run wrote and claimed goes with it.
        log.warning("job %s: batch %d was counted while this delivery ran: commit refused", job_id, batch)
        coord.settle_claims(owner, failed=True)
        delete_or_leave_to_housekeeping(rt.redis, rt.store, layout, layout.batch_objects(owner, ids))
        return coord.finished_batch(job_id, batch) or {"batch": batch, "sequence": None, "items": []}
    coord.settle_claims(owner)  # committed: its claims are no longer pending

    counts = {
        s: sum(1 for r in run.report if r["status"] == s)
        for s in ("indexed", "duplicate", "failed", "unchanged")
    }
    summary = {"batch": batch, "sequence": sequence, **counts, **run.timings.to_json()}
    if (done := coord.finished_batch(job_id, batch)) is not None:
        # Another delivery of this batch finished while this one ran (a redelivery past the
        # visibility timeout): its report and claims stand. This run may have found the staged
        # copies that run deleted ("missing"): its report must not overwrite the true one.
        return done
    rt.store.put(layout.job_report(job_id, batch), json.dumps({**summary, "items": run.report}).encode())
    coord.finish_batch(job_id, batch, summary)
    rt.store.delete_many(item["key"] for item in items if item.get("key"))  # one request per 1,000 on S3
    finish_if_done(rt, job_id, collection)
    return {**summary, "items": run.report}


class _BatchRun:
    """The state of one batch as it moves through decode, inference and the store."""

    def __init__(self, rt: Runtime, task: dict[str, Any], ids: list[int]) -> None:
        self.rt = rt
        self.task = task
        self.items: list[dict[str, Any]] = task["items"]
        self.ids = ids
        self.coord = rt.coordinator(task["collection"])
        self.extractor = rt.extractor(task["collection"])
        rt.lower_network_threads(self.extractor)
        self.timings = Timings()
        self.report: list[dict[str, Any]] = []
        self.prepared: list[Prepared] = []
        self.keep: list[int] = []  # positions embedded, in order
        self.vectors = np.zeros((0, self.extractor.spec.dim), np.float32)
        self._pending: list[int] = []
        self._chunks: list[np.ndarray] = []
        self._writes: list[Future[None]] = []
        self._written: set[int] = set()
        self._metas: dict[int, dict[str, Any]] = {}  # position -> its metadata, written in the batch object
        # Claims that change nothing before the network wait, to be made in one round trip.
        self._claims_wait = not task.get("check_unique") and not any(i.get("image_key") for i in self.items)
        self._unclaimed: list[int] = []
        self._slots: PixelSlots | None = None  # the batch's pixel block while it embeds (decode processes)

    def embed(self) -> None:
        """Decode in the pool; run the network on each ``infer_batch`` as soon as it is ready.

        Threads fetch; decode processes (when there are) decode into this batch's
        shared pixel slots, which live until the last chunk has run.
        """
        size = self.extractor.input_size
        slots = self._pixel_slots(size) if self.rt.decode_pool() is not None else None
        self._slots = slots
        try:
            self._run_chunks(slots)
        finally:
            for prepared in self.prepared:
                prepared.pixels = None  # views into the slots: drop them before the block goes
            self._slots = None
            if slots is not None:
                slots.close()

    def _pixel_slots(self, size: int) -> PixelSlots | None:
        """The batch's pixel block; None (decode in this process's threads) when shared memory
        has no room for it: slower, but the batch goes on, and the log says what to change."""
        try:
            settings = self.rt.settings
            return PixelSlots(len(self.items), size, settings.batch_size, keep=settings.embed_concurrency)
        except NoRoomForPixels as exc:
            log.warning("%s; this batch decodes in the worker's threads", exc)
            return None

    def _run_chunks(self, slots: PixelSlots | None) -> None:
        chunk = self.rt.infer_batch()
        group: list[int] = []
        for position, next_prepared in enumerate(self._prepared_in_order(slots)):
            started = time.perf_counter()
            self.prepared.append(next_prepared())
            self.timings.wait_s += time.perf_counter() - started
            group.append(position)
            if len(group) >= chunk or position == len(self.items) - 1:
                self._admit(group)  # a Redis round trip for the group's dedup claims, unless they wait
                group = []
                if len(self._pending) >= chunk:
                    self._infer()
        if self._unclaimed:
            self._claim(self._unclaimed)  # the whole batch's claims in one round trip
        if self._pending:
            self._infer()
        if self._chunks:
            self.vectors = np.concatenate(self._chunks)

    def _prepared_in_order(self, slots: PixelSlots | None) -> list[Callable[[], Prepared]]:
        """Start every item's fetch and decode now; each callable waits for its item's outcome.

        With decode processes, inline bytes go to the processes at once and fetched ones as soon
        as a thread has them: the processes never wait for the feeding process between images.
        Without, the threads fetch and decode.
        """
        rt, pool = self.rt, self.rt.pool()
        size, origin = self.extractor.input_size, self.task.get("origin") or "network"
        decoder = rt.decode_pool() if slots is not None else None
        if decoder is None or slots is None:
            futures = [pool.submit(prepare, rt, item, size, origin) for item in self.items]
            return [future.result for future in futures]
        # Small groups: every process busy from the start, and the first infer chunk ready soon.
        size_of_group = max(1, min(GROUP_MAX, len(self.items) // (4 * decoder.processes)))
        # Every decoded item is indexed (no dedup decision, no near-duplicate drop): its decode
        # process can write its stored copy at once, and read its local file itself.
        copy_keys = self._copy_keys if self._claims_wait and not self.task.get("near_duplicate") else None
        direct = ("data_b64", "path", "s3") if copy_keys else ("data_b64",)
        waits: list[Callable[[], Prepared]] = []
        numbered = list(enumerate(self.items))
        for first in range(0, len(numbered), size_of_group):
            group = numbered[first : first + size_of_group]
            if all(any(k in item for k in direct) for _, item in group):  # nothing to fetch here
                handed = hand_over(rt, decoder, group, slots, origin, copy_keys)
                outcome: Callable[[], dict[int, Prepared]] = lambda h=handed: collect(rt, decoder, h)  # noqa: E731
            else:
                future = pool.submit(hand_over, rt, decoder, group, slots, origin, copy_keys)
                outcome = lambda f=future: collect(rt, decoder, f.result())  # noqa: E731
            waits += [lambda o=outcome, n=n: o()[n] for n, _ in group]
        return waits

    def _copy_keys(self, position: int) -> tuple[str, str]:
        """Its stored copy's key and its original's ("": not kept), whoever writes them: the decode
        processes (decode_pool.Copies) or this worker's threads (``_write_images``)."""
        layout, image_id = self.coord.layout, self.ids[position]
        return layout.image(image_id), layout.original(image_id) if self.rt.settings.keep_originals else ""

    def _admit(self, positions: list[int]) -> None:
        """Record each item's outcome so far; the ones that go to the network join the pending chunk.

        The dedup claims decide which items skip the network only with ``check_unique`` or callers'
        keys; otherwise they wait, and the whole batch claims in one round trip (``_run_chunks``).
        """
        decoded = [p for p in positions if self.prepared[p].image is not None]
        if self._claims_wait:
            self._unclaimed += decoded
            owners = {p: (self.ids[p], False) for p in decoded}
        else:
            owners = self._claim(decoded)
        for p in positions:
            ref, image_id = self.items[p]["ref"], self.ids[p]
            key = {"key": self.items[p]["image_key"]} if self.items[p].get("image_key") else {}
            owner, unchanged = owners.get(p, (0, False))
            if p not in owners:
                self.report.append({"ref": ref, "status": "failed", "error": self.prepared[p].error, **key})
            elif unchanged and owner != image_id:  # its own id: a rerun after this batch committed
                self.report.append({"ref": ref, "status": "unchanged", "id": owner, **key})
            elif self.task.get("check_unique") and owner != image_id:
                self.report.append({"ref": ref, "status": "duplicate", "duplicate_of": owner, **key})
            else:
                self.report.append({"ref": ref, "status": "indexed", "id": image_id, **key})
                self._pending.append(p)

    def _claim(self, positions: list[int]) -> dict[int, tuple[int, bool]]:
        """Claim the content of these items: (owner, unchanged) of each, in one Redis round trip."""
        claims = [
            (self.prepared[p].image.sha256, self.ids[p], self.items[p].get("image_key") or "")  # type: ignore[union-attr]
            for p in positions
        ]
        owners = self.coord.claim_items(claims, batch_id(self.task["job_id"], self.task["batch"]))
        return dict(zip(positions, owners))

    def _infer(self) -> None:
        started = time.perf_counter()
        pixels = self._pending_pixels()
        self._chunks.append(self.extractor.embed(pixels))
        del pixels
        self.timings.infer_s += time.perf_counter() - started
        for p in self._pending:
            self.prepared[p].pixels = None  # free memory as we go
        if not self.task.get("near_duplicate"):  # nothing can drop these now: write while the next chunk runs
            self._write_images(self._pending)
        self.keep.extend(self._pending)
        self._pending.clear()

    def _pending_pixels(self) -> np.ndarray:
        """The pending images' pixels as one array: a view of their slots when they are consecutive
        (the usual case: no image of the chunk failed), so the feeding process copies no pixels
        (150 KB per image at 224); else a stacked copy. The extractors only read it."""
        first, last = self._pending[0], self._pending[-1]
        slots = self._slots
        if slots is not None and slots.array is not None and last - first + 1 == len(self._pending):
            return slots.array[first : last + 1]  # the slot of an item is its position (hand_over)
        return np.stack([self.prepared[p].pixels for p in self._pending])  # type: ignore[misc]

    def _write_images(self, positions: list[int]) -> None:
        """One write per image (its stored copy; the original too with PUPYL_KEEP_ORIGINALS); the
        metadata waits for the batch's one object (``commit``)."""
        pool, put = self.rt.pool(), self.rt.store.put
        for p in positions:
            key, original_key = self._copy_keys(p)
            meta = _metadata(self.ids[p], self.items[p], self.prepared[p].image, self._uri(key))  # type: ignore[arg-type]
            self._metas[p] = meta
            self._written.add(p)
            if self.prepared[p].stored:
                continue
            self._writes.append(pool.submit(put, key, self.prepared[p].normalized))
            if original_key:
                self._writes.append(pool.submit(put, original_key, self.prepared[p].original))

    def _uri(self, key: str) -> str:
        return f"{self.rt.store.url.rstrip('/')}/{key}"

    def rows(self) -> SegmentRows:
        """What the segment says of each kept row beside its vector: key, sha256, attributes and the
        built-in values a filter reads (so a searcher filters without reading any metadata)."""
        return SegmentRows(
            [self.items[p].get("image_key") or None for p in self.keep],
            [self.prepared[p].image.sha256 for p in self.keep],  # type: ignore[union-attr]
            [self.items[p].get("attributes") or None for p in self.keep],
            [builtin_values(self._metas[p]) for p in self.keep],
        )

    def commit(self, batch_id: str) -> int:
        """Write images and the batch's metadata object (in parallel), then the segment, then publish it.

        Keyed rows take their keys over in the same commit; the ids those keys named before are
        tombstoned by it (coordination.Coordinator.commit) and then retired in the store.
        """
        started = time.perf_counter()
        layout = self.coord.layout
        self._write_images([p for p in self.keep if p not in self._written])
        segment = layout.segment(batch_id)
        rows = self.rows()
        keyed = [
            (key, self.ids[p], sha)
            for p, key, sha in zip(self.keep, rows.keys, rows.sha256)
            if key is not None and sha is not None
        ]

        def write() -> str:
            """Only the run holding the segment's write claim writes the metadata object and it."""
            meta = metadata.encode_batch(batch_id, [self._metas[p] for p in self.keep])
            self._writes.append(self.rt.pool().submit(self.rt.store.put, layout.batch_meta(batch_id), meta))
            self._wait_for_writes()
            data = encode_segment(np.array([self.ids[p] for p in self.keep]), self.vectors, rows)
            self.rt.store.put(segment, data)
            return integrity.sha256(data)  # recorded by the commit's own Lua call, not before it

        def publish(checksum: str | None, writer: str | None) -> tuple[int, list[tuple[int, str]]]:
            self._wait_for_writes()  # a rerun too: its copies land before its answer does
            return self.coord.commit(
                segment,
                images=len(self.keep),
                keyed=keyed,
                checksum=checksum,
                writer=writer,
                batch=(self.task["job_id"], int(self.task["batch"])),
            )

        # A committed segment is immutable: a rerun must not rewrite it (the commit recorded its
        # checksum), nor the metadata object written before it; and of two live runs of the batch
        # only the one holding its write claim writes them (write_claim.py). The other waits: for
        # the holder's commit (then it writes nothing), or to take the claim over.
        sequence, replaced = write_once(self.coord, segment, write, publish)
        if replaced:
            keys.retire(self.rt.store, self.coord, replaced, {key: i for key, i, _ in keyed})
            self._mark_replaced({old for old, _ in replaced})
        self.timings.write_s = time.perf_counter() - started
        return sequence

    def _wait_for_writes(self) -> None:
        for write in self._writes:
            write.result()

    def _mark_replaced(self, gone: set[int]) -> None:
        """A key given twice in one batch: its earlier row was replaced by its later one at once."""
        for n, row in enumerate(self.report):
            if row.get("status") == "indexed" and row.get("id") in gone:
                self.report[n] = {**row, "replaced": True}


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
            before = report[position]
            report[position] = {
                "ref": before["ref"],
                **({"key": before["key"]} if "key" in before else {}),  # the caller's key stays in the report
                "status": "duplicate",
                "duplicate_of": match[0],
                "distance": round(match[1], 6),
            }
            continue
        kept.append(position)
    rows = [keep.index(p) for p in kept]
    return kept, vectors[rows]


def _drop_copies(
    rt: Runtime, task: dict[str, Any], run: _BatchRun, ids: list[int], short_lists: ShortLists | None
) -> tuple[list[int], np.ndarray]:
    """The near-duplicate check in copy mode: edited re-uploads are verified copies (OpenCV).

    Its local features need the images again: decoded from their normalized copies (copy mode only).
    """
    if short_lists is None:
        raise RuntimeError("copy-mode near-duplicate detection needs a search worker (no short lists given)")
    from pupyl_queue.copysearch import drop_copies

    size = run.extractor.input_size
    images = [decode(run.prepared[p].normalized, rt.settings.max_pixels, target=size) for p in run.keep]
    return drop_copies(rt, task, run.keep, run.vectors, ids, run.report, images, short_lists)


def _metadata(
    image_id: int, item: dict[str, Any], image: ImageInfo, internal_path: str = ""
) -> dict[str, Any]:
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
    if internal_path:
        meta["internal_path"] = internal_path  # the stored copy's store URI
    if item.get("image_key"):
        meta["key"] = item["image_key"]
    if item.get("attributes"):
        meta["attributes"] = item["attributes"]
    return meta


def compaction_due(rt: Runtime, collection: str, sequence: int | None) -> bool:
    """True once per PUPYL_COMPACT_COMMITS commits past the last snapshot (a Redis flag dedups)."""
    if sequence is None:
        return False
    coord = rt.coordinator(collection)
    if sequence - coord.snapshot_watermark() < rt.settings.compact_commits:
        return False
    return bool(rt.redis.set(coord.layout.key("compact-due"), 1, nx=True, ex=3600))
