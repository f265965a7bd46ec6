"""The producer client, shaped like pupyl's ``PupylImageSearch``.

It imports neither TensorFlow nor FAISS: it only sends JSON task messages and
reads results and job counters, so any application can embed it cheaply.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import time
import uuid
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery.result import AsyncResult

from pupyl_queue import constants as C
from pupyl_queue.attributes import check_attributes, check_key, parse_filter
from pupyl_queue.characteristics import Characteristic
from pupyl_queue.coordination import Coordinator, connect, read_job
from pupyl_queue.layout import Layout, check_collection
from pupyl_queue.payloads import (
    CompactRequest,
    IndexRequest,
    RemoveRequest,
    SearchQuery,
    SearchRequest,
    SetAttributesRequest,
)
from pupyl_queue.settings import Settings
from pupyl_queue.stack import discover_redis_url
from pupyl_queue.store import ObjectNotFound, ObjectStore, StoreUnavailable, open_store
from pupyl_queue.whitening import check_whitening


class JobFailed(RuntimeError):
    """The job as a whole failed (e.g. unreadable URI, model mismatch)."""


class TaskFailed(RuntimeError):
    """A worker refused or failed a request; the message is the worker's reason."""


def wait_result(result: AsyncResult, timeout: float) -> Any:
    """A task's result; a worker-side failure becomes TaskFailed with the worker's message."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    try:
        return result.get(timeout=timeout)
    except CeleryTimeout:
        raise TimeoutError(f"no answer from a worker within {timeout}s (is one running?)") from None
    except Exception as exc:  # the worker's exception, rebuilt from JSON
        raise TaskFailed(f"{type(exc).__name__}: {exc}") from None


class Job:
    """A bulk index job; ignore it (fire-and-forget) or wait on it."""

    def __init__(self, client: PupylQueue, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def progress(self) -> dict[str, Any]:
        """Counters: total discovered, indexed, duplicate, failed, in_flight; state and times."""
        state = read_job(self.client.redis, self.id)
        if state is None:
            raise KeyError(f"no job {self.id}")
        finished = sum(int(state.get(k) or 0) for k in ("indexed", "duplicate", "failed", "unchanged"))
        state["in_flight"] = max(0, int(state.get("total") or 0) - finished)
        return state

    def done(self) -> bool:
        return self.progress().get("state") in C.JOB_ENDED

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.2,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the job ends (``done`` or ``partial``: see ``failures()``); raises JobFailed
        or TimeoutError.

        A job that made no progress for PUPYL_JOB_STALL_S is checked for lost tasks (the beat
        sweep's check, pupyl_queue/jobs.py) and ended when none is left, so no wait outlives its job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        checked = time.monotonic()
        while True:
            state = self.progress()
            if on_progress is not None:
                on_progress(state)  # e.g. the CLI's progress bar
            if state.get("state") == "failed":
                raise JobFailed(f"job {self.id} failed: {state.get('error')}")
            if state.get("state") in C.JOB_ENDED:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {state.get('state')} after {timeout}s")
            if time.monotonic() - checked >= min(30.0, self.client.settings.job_stall_s):
                checked = time.monotonic()
                self.end_if_lost()
                continue
            time.sleep(poll)

    def end_if_lost(self) -> str | None:
        """End this job if it stalled with no task left (pupyl_queue/jobs.py); its new state, or None."""
        from pupyl_queue.jobs import end_if_lost

        pq = self.client
        return end_if_lost(
            pq.redis, lambda: pq.store, self.id, pq.settings.job_stall_s, ttl=pq.settings.job_ttl
        )

    def report(self) -> list[dict[str, Any]]:
        """Every item of the job with its outcome, read from the store (survives Redis, and the
        job's Redis record, which expires PUPYL_JOB_TTL after the job ends).

        A batch that failed for good keeps its items in Redis too (its report may never have
        reached the store): while the store is unreachable, those are all this gives.
        """
        state = read_job(self.client.redis, self.id)
        layout = Layout(state["collection"] if state else self.client.collection)
        in_redis: dict[str, list[dict[str, Any]]] = {}
        for raw in self.client.redis.hvals(layout.job_key(self.id) + ":batches"):
            summary = json.loads(raw)
            if "items" in summary:
                in_redis[layout.job_report(self.id, int(summary["batch"]))] = summary["items"]
        try:
            keys = set(self.client.store.list(layout.job_reports(self.id) + "/"))
        except StoreUnavailable:
            keys = set()
        items: list[dict[str, Any]] = []
        for key in sorted(keys | set(in_redis)):
            if key in in_redis:
                items.extend(in_redis[key])
                continue
            try:
                items.extend(json.loads(self.client.store.get(key))["items"])
            except ObjectNotFound:
                continue
        return items

    def failures(self) -> list[dict[str, Any]]:
        return [item for item in self.report() if item["status"] == "failed"]

    @property
    def sequence(self) -> int:
        """The commit sequence a search must reach to see everything this job indexed."""
        raw = self.client.redis.hgetall(Layout().job_key(self.id) + ":batches")
        return max((int(json.loads(v).get("sequence") or 0) for v in raw.values()), default=0)


class PupylQueue:
    """Index, search and remove images through the pupyl-queue workers."""

    def __init__(
        self,
        characteristic: Characteristic | int | str | None = None,
        collection: str = C.DEFAULT_COLLECTION,
        model: str | Path | None = None,
        precision: str | None = None,
        descriptor: str | None = None,
        settings: Settings | None = None,
        whitening: str | None = None,
        **overrides: Any,
    ) -> None:
        settings = settings or Settings.from_env(**overrides)
        if not settings.redis_url:
            settings = settings.replace(redis_url=discover_redis_url(settings))
        self.settings = settings
        self.collection = check_collection(collection)
        self.characteristic = None if characteristic is None else Characteristic.parse(characteristic)
        self.precision = precision
        if descriptor is not None and descriptor not in C.DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {', '.join(C.DESCRIPTORS)}, got {descriptor!r}")
        self.descriptor = descriptor  # new collections only; None: PUPYL_DESCRIPTOR
        # new collections only; None: PUPYL_WHITENING. "pca" learns PCA whitening at compaction.
        self.whitening = None if whitening is None else check_whitening(whitening)
        model = model or settings.model or None
        self.model = str(Path(model).expanduser().resolve()) if model else None

    @cached_property
    def app(self):  # type: ignore[no-untyped-def]
        from pupyl_queue.celery_app import make_app

        return make_app(self.settings, include_tasks=False)

    @cached_property
    def redis(self):  # type: ignore[no-untyped-def]
        return connect(self.settings.broker_url)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    # --- index
    def index(
        self,
        uri: str | Path,
        check_unique: bool = False,
        near_duplicate: float | None = None,
        origin: str = "local",
    ) -> Job:
        """Queue a bulk job for a folder, file, glob, archive, list, URL or s3:// prefix; returns at once.

        ``check_unique`` refuses exact copies (same bytes) of indexed images;
        ``near_duplicate`` (a cosine distance, e.g. 0.05) also refuses images that
        close to an indexed one. Default: PUPYL_NEAR_DUPLICATE (0 = off).
        """
        local = origin == "local" and Path(str(uri)).expanduser().exists()
        uri = str(Path(uri).expanduser().resolve()) if local else str(uri)
        return self._send_index(uuid.uuid4().hex, uri, check_unique, near_duplicate, origin)

    def index_uploads(
        self,
        files: Iterable[tuple[str, bytes]],
        check_unique: bool = False,
        near_duplicate: float | None = None,
        keyed: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a job for images given as (file name, bytes): they go to the store first.

        ``keyed``: ``{"key", "attributes"}`` of the one image of an upsert, or ``{"uploads": [...]}``
        giving file n its own ``{"key", "attributes"}`` (or ``{"error"}``, which fails that file).

        The way to index from a machine the workers cannot read (the API's multipart uploads).
        The job is recorded (state ``uploading``) before its first byte is stored: an uploader
        killed half-way leaves a job that housekeeping fails, and whose files it deletes, once
        PUPYL_UPLOAD_GRACE has passed (before, nothing referred to them and they stayed for good).
        """
        from pupyl_queue.housekeeping import abandon_upload

        job_id = uuid.uuid4().hex
        layout = Layout(self.collection)
        uri = C.UPLOAD_SCHEME + job_id
        coord = Coordinator(self.redis, layout)
        coord.create_job(job_id, {"state": "uploading", "uri": uri, "collection": self.collection})
        try:
            for number, (name, data) in enumerate(files):
                self.store.put(layout.upload(job_id, number, name), bytes(data))
        except Exception as exc:
            reason = f"the upload failed: {type(exc).__name__}: {exc}"
            # Redis or the store down as well: the job stays "uploading" and housekeeping ends it later.
            with contextlib.suppress(StoreUnavailable, redis.RedisError):
                abandon_upload(self.store, coord, job_id, reason, self.settings.job_ttl)
            raise
        return self._send_index(job_id, uri, check_unique, near_duplicate, "network", True, keyed)

    def _send_index(
        self,
        job_id: str,
        uri: str,
        check_unique: bool,
        near_duplicate: float | None,
        origin: str,
        uploaded: bool = False,
        keyed: dict[str, Any] | None = None,
    ) -> Job:
        request = self.index_request(job_id, uri, check_unique, near_duplicate, origin, keyed)
        coord = Coordinator(self.redis, Layout(self.collection))
        if not uploaded:
            coord.create_job(job_id, {"state": "queued", "uri": uri, "collection": self.collection})
        elif not coord.update_job_if(job_id, "uploading", state="queued"):
            # Housekeeping gave up on this upload (PUPYL_UPLOAD_GRACE) and deleted its files.
            error = (read_job(self.redis, job_id) or {}).get("error") or "its record is gone"
            raise JobFailed(f"job {job_id} failed: {error}")
        self.app.send_task(C.TASK_INDEX, kwargs=request, task_id=job_id)
        return Job(self, job_id)

    def index_request(
        self,
        job_id: str,
        uri: str,
        check_unique: bool,
        near_duplicate: float | None,
        origin: str,
        keyed: dict[str, Any] | None = None,
    ) -> IndexRequest:
        """The ``pupyl.index`` kwargs this client sends (docs/tasks.md; tests/test_payloads.py)."""
        request: IndexRequest = {
            "job_id": job_id,
            "collection": self.collection,
            "uri": uri,
            "check_unique": bool(check_unique),
            "near_duplicate": float(
                self.settings.near_duplicate if near_duplicate is None else near_duplicate
            ),
            "characteristic": None if self.characteristic is None else int(self.characteristic),
            "default_characteristic": int(self.settings.characteristic),
            "model": self.model,
            "precision": self.precision,
            "default_precision": self.settings.precision,
            "descriptor": self.descriptor,
            "default_descriptor": self.settings.descriptor,
            "whitening": self.whitening,
            "default_whitening": self.settings.whitening,
            "origin": origin,  # "local": this process may name any path its workers can read
            **(keyed or {}),  # {"key", "attributes"}: the one image of an upsert
        }
        return request

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def index_items(
        self,
        items: Iterable[dict[str, Any]],
        check_unique: bool = False,
        near_duplicate: float | None = None,
        origin: str = "local",
    ) -> Job:
        """One job for listed images, each with its own key and attributes.

        ``[{"uri": "https://.../a.jpg", "key": "sku-1", "attributes": {"price": 59}}, ...]``: at most
        MAX_REQUEST_ITEMS rows (they travel in the task message; a bigger catalogue is a list file,
        README "What `index` takes"). A bad row fails alone, with its reason (``items:<row>``).
        """
        rows = [_resolved(row) if origin == "local" else row for row in items]
        if not 0 < len(rows) <= C.MAX_REQUEST_ITEMS:
            raise ValueError(f"items: 1 to {C.MAX_REQUEST_ITEMS} rows (more: index a list file)")
        if len(json.dumps(rows)) > C.MAX_REQUEST_ITEMS_BYTES:
            raise ValueError(f"items: at most {C.MAX_REQUEST_ITEMS_BYTES} bytes of JSON (more: a list file)")
        job_id = uuid.uuid4().hex
        uri = C.ITEMS_SCHEME + job_id
        return self._send_index(job_id, uri, check_unique, near_duplicate, origin, keyed={"items": rows})

    # --- callers' keys
    def upsert_async(
        self,
        image: str | Path | bytes,
        key: str,
        attributes: dict[str, Any] | None = None,
        origin: str = "local",
    ) -> Job:
        """Index one image under the caller's ``key``; returns its job at once.

        ``image``: the bytes, or a path or URL the workers can read. A key that names an image
        already is replaced in one commit (its old id is tombstoned by the commit that adds the new
        one); the same bytes under the same key change nothing (status ``unchanged``).
        """
        keyed = {"key": check_key(key), "attributes": check_attributes(attributes) or None}
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.index_uploads([("image", bytes(image))], keyed=keyed)
        local = origin == "local" and Path(str(image)).expanduser().exists()
        uri = str(Path(image).expanduser().resolve()) if local else str(image)
        return self._send_index(uuid.uuid4().hex, uri, False, 0.0, origin, keyed=keyed)

    def upsert(
        self,
        image: str | Path | bytes,
        key: str,
        attributes: dict[str, Any] | None = None,
        timeout: float | None = None,
        origin: str = "local",
    ) -> dict[str, Any]:
        """``upsert_async``, waited for: the image's report, with the commit ``sequence`` to search at.

        ``{"status": "indexed", "id": 41, "key": "sku-1", "sequence": 12}``, ``"unchanged"`` (the
        key's image is these bytes already; ``id`` is its id), or ``"failed"`` with ``error``.
        """
        job = self.upsert_async(image, key, attributes, origin)
        job.wait(timeout=timeout or 300)
        items = job.report()
        item = items[0] if items else {"status": "failed", "error": "the job indexed nothing"}
        return {**item, "key": key, "sequence": job.sequence}

    def set_attributes(
        self, key: str, attributes: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Replace the attributes of the image ``key`` names, without embedding it again.

        ``{"key", "updated": True, "id": <new id>, "replaced": <old id>, "sequence": n}``: like any
        upsert, the change is a new id under the same key, committed with the old id's tombstone.
        ``updated: False`` with a ``reason`` when the key names nothing, or moved on meanwhile.
        """
        result = self.app.send_task(
            C.TASK_SET_ATTRIBUTES, kwargs=self.set_attributes_request(key, attributes)
        )
        return wait_result(result, timeout or self.settings.search_timeout)

    def set_attributes_request(self, key: str, attributes: dict[str, Any]) -> SetAttributesRequest:
        """The ``pupyl.set_attributes`` kwargs: checked here, with a fresh ``update_id``."""
        return {
            "collection": self.collection,
            "key": check_key(key),
            "attributes": check_attributes(attributes),
            "update_id": uuid.uuid4().hex,
        }

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The image a caller's key names now: ``{"key", "id", "sequence", "sha256"}``, or None."""
        return Coordinator(self.redis, Layout(self.collection)).lookup(check_key(key))

    # --- search
    def search_async(
        self,
        query: Any,
        top: int = 4,
        return_metadata: bool = False,
        min_sequence: int = 0,
        allow_partial: bool = False,
        mode: str = "similar",
        filter: dict[str, Any] | None = None,  # noqa: A002 - the task field's name
    ) -> AsyncResult:
        """The search task's AsyncResult; on a sharded cluster its result also says ``partial``.

        ``mode="copy"`` finds the original of an edited copy: the result also has
        ``copy: {found, id, score, inliers}`` (docs/tasks.md).
        """
        request = self.search_request(query, top, return_metadata, min_sequence, allow_partial, mode, filter)
        return self.app.send_task(C.TASK_SEARCH, kwargs=request)

    def search_request(
        self,
        query: Any,
        top: int = 4,
        return_metadata: bool = False,
        min_sequence: int = 0,
        allow_partial: bool = False,
        mode: str = "similar",
        filter: dict[str, Any] | None = None,  # noqa: A002 - the task field's name
    ) -> SearchRequest:
        """The ``pupyl.search`` kwargs; a query image too large to travel inline goes to the store."""
        if mode not in ("similar", "copy"):
            raise ValueError(f"mode must be similar or copy, not {mode!r}")
        request: SearchRequest = {
            "collection": self.collection,
            "query": self._query(query),
            "top": int(top),
            "metadata": bool(return_metadata),
            "min_sequence": int(min_sequence),
            "allow_partial": bool(allow_partial),
        }
        if mode != "similar":
            request["mode"] = "copy"
        if filter is not None:
            parse_filter(filter)  # a bad filter fails here, with the reason
            request["filter"] = filter
        return request

    def search(
        self,
        query: Any,
        top: int = 4,
        return_metadata: bool = False,
        return_distances: bool = False,
        min_sequence: int = 0,
        timeout: float | None = None,
        mode: str = "similar",
        filter: dict[str, Any] | None = None,  # noqa: A002 - the task field's name
    ) -> list[Any]:
        """As pupyl: ids; or metadata dicts with ``distance``; or ``(id, distance)`` tuples.

        Distances are cosine distances (0 = same direction; smaller is closer). With
        ``mode="copy"`` verified copies of the query come first and metadata dicts also
        carry ``copy_score`` (the probability that the row is the query's original; None
        when it was not verified); ``find_original`` gives the verdict alone.
        ``filter`` ranks only the images whose attributes (and built-in fields: format, width,
        height, job, indexed_at, path) it allows: ``{"color": "red", "price": {"lt": 100}}``.
        """
        result = self.search_async(query, top, return_metadata, min_sequence, mode=mode, filter=filter)
        answer = wait_result(result, timeout or self.settings.search_timeout)
        rows = answer["results"]
        if return_metadata:
            copy = mode == "copy"
            return [
                {
                    **(row.get("metadata") or {"id": row["id"]}),
                    "distance": row["distance"],
                    **({"copy_score": row.get("copy_score")} if copy else {}),
                }
                for row in rows
            ]
        if return_distances:
            return [(row["id"], row["distance"]) for row in rows]
        return [row["id"] for row in rows]

    def find_original(self, query: Any, timeout: float | None = None) -> dict[str, Any]:
        """Is this image an edited copy of an indexed one? ``{found, id, score, inliers}``.

        ``score`` is the probability that ``id`` is the query's original (local features
        verified by RANSAC); ``found`` is ``score >= 0.5``.
        """
        result = self.search_async(query, top=1, mode="copy")
        return dict(wait_result(result, timeout or self.settings.search_timeout)["copy"])

    def _query(self, query: Any) -> SearchQuery:
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            return {"id": int(query)}
        if isinstance(query, np.ndarray):
            return {"vector": query.astype(float).ravel().tolist()}
        if isinstance(query, (str, Path)):
            path = Path(query).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"query image {path} not found")
            if path.stat().st_size > self.settings.max_image_bytes:
                raise ValueError(f"query image {path} is larger than PUPYL_MAX_IMAGE_BYTES")
            query = path.read_bytes()
        if isinstance(query, (bytes, bytearray)):
            if len(query) <= self.settings.inline_limit:
                return {"image_b64": base64.b64encode(query).decode()}
            key = Layout(self.collection).query(uuid.uuid4().hex)
            self.store.put(key, bytes(query))
            return {"key": key}
        raise TypeError(f"cannot search by {type(query).__name__}: give a path, bytes, an id or a vector")

    # --- export
    def export(
        self, query: Any, out: str | Path, top: int = 4, keep_ids: bool = False, keep_names: bool = False
    ) -> list[Path]:
        """Write the ranked results' images to a folder, as pupyl's export: ``<rank>.<ext>`` by default,
        ``<rank>_<id>.<ext>`` with keep_ids, ``<rank>_<original name>`` with keep_names. The file
        is the original as uploaded when the collection keeps originals, else the normalized JPEG.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        layout = Layout(self.collection)
        written = []
        for rank, hit in enumerate(self.search(query, top=top, return_metadata=True), 1):
            image_id = hit["id"]
            try:
                data, ext = self.store.get(layout.original(image_id)), Path(hit["original_file_name"]).suffix
            except ObjectNotFound:
                data, ext = self.store.get(layout.image(image_id)), ".jpg"
            if keep_names:
                name = f"{rank}_{Path(hit['original_file_name']).stem}{ext}"
            elif keep_ids:
                name = f"{rank}_{image_id}{ext}"
            else:
                name = f"{rank}{ext}"
            path = out / name.replace("/", "_")
            path.write_bytes(data)
            written.append(path)
        return written

    # --- collections
    def collections(self) -> list[str]:
        from pupyl_queue.catalog import list_collections

        return list_collections(self.store)

    def describe(self, collection: str | None = None) -> dict[str, Any]:
        from pupyl_queue.catalog import describe_collection

        return describe_collection(self.store, self.redis, collection or self.collection)

    def delete_collection(self, collection: str | None = None) -> dict[str, Any]:
        from pupyl_queue.catalog import delete_collection

        return delete_collection(self.store, self.redis, check_collection(collection or self.collection))

    def backup(self, dest: str | Path, collection: str | None = None) -> dict[str, Any]:
        """Back the collection up to an archive file (.tar, .tar.gz) or an empty s3:// or file:// prefix."""
        from pupyl_queue.backup import backup

        return backup(self.store, self.redis, collection or self.collection, str(dest), self.settings)

    def restore(self, src: str | Path, as_name: str | None = None) -> dict[str, Any]:
        """Restore a backup into an empty collection (its own name, or ``as_name``); checks it all first."""
        from pupyl_queue.backup import restore

        return restore(str(src), self.store, self.redis, self.settings, as_name)

    def metadata(self, image_id: int) -> dict[str, Any] | None:
        """An indexed image's metadata; None when there is no such image (or it was removed)."""
        from pupyl_queue.metadata import read_one

        return read_one(self.store, self.redis, Layout(self.collection), int(image_id))

    # --- remove and maintenance
    def remove_async(self, index: int | None = None, key: str | None = None) -> AsyncResult:
        """Remove an image by id, or (``key=``) the image a caller's key names; the key goes with it."""
        return self.app.send_task(C.TASK_REMOVE, kwargs=self.remove_request(index, key))

    def remove_request(self, index: int | None = None, key: str | None = None) -> RemoveRequest:
        """The ``pupyl.remove`` kwargs: an id, or a caller's key."""
        if (index is None) == (key is None):
            raise ValueError("remove takes an id or a key")
        if index is not None:
            return {"collection": self.collection, "id": int(index)}
        return {"collection": self.collection, "key": check_key(key)}

    def remove(
        self, index: int | None = None, timeout: float | None = None, key: str | None = None
    ) -> dict[str, Any]:
        return wait_result(self.remove_async(index, key), timeout or self.settings.search_timeout)

    def compact(self, timeout: float | None = None) -> dict[str, Any]:
        request: CompactRequest = {"collection": self.collection}
        result = self.app.send_task(C.TASK_COMPACT, kwargs=request)
        return wait_result(result, timeout or 600)

    def for_collection(self, collection: str) -> PupylQueue:
        """This client for another collection, sharing its Redis pool, Celery app and store.

        A view costs no connection, so a server can make one per request (the API does). Close only
        the client the views came from.
        """
        _ = self.redis, self.app, self.store  # made once here, then shared by every view
        view = copy.copy(self)
        view.collection = check_collection(collection)
        return view

    def close(self) -> None:
        if "app" in self.__dict__:
            self.app.close()
        if "redis" in self.__dict__:
            self.redis.close()


def _resolved(row: Any) -> Any:
    """A listed row whose ``uri`` is a relative local path, made absolute here (the caller's cwd)."""
    uri = row.get("uri", row.get("url")) if isinstance(row, dict) else None
    if not isinstance(uri, str) or "://" in uri or not Path(uri).expanduser().exists():
        return row
    rest = {k: v for k, v in row.items() if k != "url"}
    return {**rest, "uri": str(Path(uri).expanduser().resolve())}
