"""The HTTP face of pupyl-queue (aiohttp): index, jobs, search, tasks, images, health.

Every route answers JSON, errors included: ``{"error": {"code": ..., "message": ...}}`` with
the right 4xx. Requests need ``Authorization: Bearer <token>`` (PUPYL_API_TOKENS) unless
PUPYL_API_AUTH=false; tokens are compared in constant time and never logged. Blocking calls
(Redis, the result backend, the store) run in the default executor. Index requests from here
are ``origin: network``: local paths only under PUPYL_ALLOWED_ROOTS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from pupyl_queue import constants as C
from pupyl_queue.attributes import InvalidAttribute, check_attributes, check_key, parse_filter
from pupyl_queue.client import JobFailed, PupylQueue, TaskFailed, wait_result
from pupyl_queue.fetch import Fetcher, FetchError, FetchRefused
from pupyl_queue.layout import Layout, check_collection
from pupyl_queue.settings import Settings
from pupyl_queue.sources import OUTSIDE_ROOTS, LocalRefused, Sources, is_url
from pupyl_queue.store import ObjectNotFound

log = logging.getLogger(__name__)
CLIENT = web.AppKey("client", PupylQueue)
SETTINGS = web.AppKey("settings", Settings)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN = {"/", "/healthz", "/readyz", "/v1/openapi.json"}  # and /static/: the page's assets
METRICS_PATH = "/metrics"  # an API token or a metrics token (PUPYL_METRICS_TOKENS)
IMAGE_ID = re.compile(r"[0-9]{1,19}")  # ASCII digits only: no sign, no '_', no other scripts' digits
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # Celery's uuid4
JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
MAX_VECTOR = 8192  # values in a query vector (the widest network has 2048)
MAX_URI = 4096
METRICS = web.AppKey("metrics", object)
FORM_FIELD_BYTES = 64 * 1024  # a form field that is not a file (top, collection, ...)
STATIC = Path(__file__).with_name("static")


class ApiError(web.HTTPException):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": {"code": code, "message": message}}), content_type="application/json"
        )


def client(request: web.Request, collection: Any = None) -> PupylQueue:
    """The client of the collection a request names: a view of the app's one client, sharing its
    Redis pool and Celery app, so a request with a new name costs no connection and leaves nothing
    behind (one pool per name once let unauthenticated requests exhaust file descriptors).
    """
    name = request.query.get("collection") if collection is None else collection
    name = C.DEFAULT_COLLECTION if name is None or name == "" else name
    try:
        check_collection(name)
    except ValueError as exc:
        raise ApiError(400, "bad_collection", str(exc)) from None
    return request.app[CLIENT].for_collection(name)


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:  # aiohttp's own (404, 405, 413, ...): same JSON shape
        code = exc.reason.lower().replace(" ", "_")
        raise ApiError(exc.status, code, exc.reason) from None
    except TaskFailed as exc:
        raise ApiError(422, "task_failed", str(exc)) from None
    except JobFailed as exc:  # e.g. an upload that outlasted PUPYL_UPLOAD_GRACE and was given up on
        raise ApiError(422, "job_failed", str(exc)) from None
    except TimeoutError as exc:
        raise ApiError(504, "timeout", str(exc)) from None
    except Exception:  # a bug, not a bad request: a logged 500 that tests and fuzzers can see
        log.exception("%s %s failed", request.method, request.path)
        raise ApiError(500, "internal", "internal error (logged on the server)") from None


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if settings.api_auth and request.path not in OPEN and not request.path.startswith("/static/"):
        tokens = _tokens(settings.api_tokens)
        if request.path == METRICS_PATH:
            tokens += _tokens(settings.metrics_tokens)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        valid = scheme.lower() == "bearer" and any(
            hmac.compare_digest(given.strip().encode(), t.encode()) for t in tokens
        )
        if not valid:
            raise ApiError(
                401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)"
            )
    return await handler(request)


@dataclass
class Upload:
    name: str
    data: bytes
    key: str | None = None  # the form fields "key" / "attributes" that follow this file's part
    attributes: str | None = None


PER_FILE = ("key", "attributes")  # multipart fields that belong to the file part before them


async def read_form(request: web.Request) -> tuple[list[Upload], dict[str, Any]]:
    """A multipart body read part by part, within the upload limits (aiohttp's own limit only
    covers ``request.post()``): one file at most PUPYL_MAX_IMAGE_BYTES, all at most PUPYL_API_MAX_BODY.
    """
    try:
        return await _read_parts(await request.multipart(), request.app[SETTINGS])
    except (HttpProcessingError, ValueError, AssertionError) as exc:  # aiohttp's parser on bad input
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be read: {exc}") from None


async def _read_parts(reader: MultipartReader, settings: Settings) -> tuple[list[Upload], dict[str, Any]]:
    files: list[Upload] = []
    fields: dict[str, Any] = {}
    total = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "bad_multipart", "nested multipart bodies are not accepted")
        limit = settings.max_image_bytes if part.filename else FORM_FIELD_BYTES
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            total += len(chunk)
            if len(data) > limit or total > settings.api_max_body:
                raise ApiError(
                    413,
                    "too_large",
                    f"upload over the limit: {limit} bytes per {'file' if part.filename else 'field'}, "
                    f"{settings.api_max_body} in all (PUPYL_MAX_IMAGE_BYTES, PUPYL_API_MAX_BODY)",
                )
        if part.filename is not None:
            files.append(Upload(part.filename or f"upload-{len(files)}", bytes(data)))
        elif part.name in PER_FILE:
            if not files:
                raise ApiError(400, "bad_request", f"a '{part.name}' field follows the file part it names")
            if getattr(files[-1], part.name) is not None:
                raise ApiError(400, "bad_request", f"file {len(files) - 1}: two '{part.name}' fields")
            setattr(files[-1], part.name, data.decode("utf-8", "replace"))
        elif part.name:
            fields[part.name] = data.decode("utf-8", "replace")
    return files, fields


def integer(value: Any, name: str, default: int | None, low: int, high: int) -> int:
    """An integer option from JSON or a form field, within [low, high]; ``default=None``: required.

    Strings are plain ASCII digits: ``int()`` would also take "+1", "1_0" and other scripts' digits.
    """
    if value is None and default is not None:
        return default
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}", value.strip()):
        number = int(value.strip())
    if number is None or not low <= number <= high:
        raise ApiError(400, "bad_request", f"{name} must be an integer from {low} to {high}")
    return number


def text_field(options: dict[str, Any], name: str, limit: int) -> str:
    """A required string field of a JSON body: null, numbers and objects are refused, not stringified."""
    value = options.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", f"'{name}' must be a non-empty string")
    if len(value) > limit:
        raise ApiError(400, "bad_request", f"'{name}' is longer than {limit} characters")
    return value


def query_vector(value: Any) -> Any:
    """A query vector from JSON: a list of numbers, scaled to unit length in float64 here (in float32,
    values such as 1e-30 square to zero and every distance came out 0.0)."""
    import numpy as np

    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_VECTOR
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        raise ApiError(400, "bad_request", f"'vector' is a list of 1 to {MAX_VECTOR} numbers")
    vector = np.asarray(value, dtype=np.float64)
    scale = float(np.abs(vector).max()) if np.isfinite(vector).all() else 0.0
    if scale == 0.0:
        raise ApiError(400, "bad_request", "'vector' must be finite and not all zero")
    vector = vector / scale
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def flag(value: Any, default: bool) -> bool:
    """A boolean from JSON (true) or a form/query field ("true", "1", "yes")."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


async def body_json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return data


# --- routes
def _file_keys(files: list[Upload]) -> list[dict[str, Any]] | None:
    """Each uploaded file's key and attributes, or the reason they are refused (that file fails
    alone, with it); None when no file has either."""
    if all(f.key is None and f.attributes is None for f in files):
        return None
    keys: list[dict[str, Any]] = []
    for f in files:
        try:
            keys.append(
                {
                    "key": check_key(f.key) if f.key is not None else None,
                    "attributes": check_attributes(f.attributes) if f.attributes is not None else None,
                }
            )
        except InvalidAttribute as exc:
            keys.append({"error": str(exc)})
    return keys


def _items(data: dict[str, Any]) -> list[Any]:
    """A JSON index request's ``items``: checked as a whole here (size); each row by the workers."""
    items = data["items"]
    if "uri" in data:
        raise ApiError(400, "bad_request", "give 'uri' or 'items', not both")
    if not isinstance(items, list) or not 0 < len(items) <= C.MAX_REQUEST_ITEMS:
        raise ApiError(400, "bad_request", f"'items' is a list of 1 to {C.MAX_REQUEST_ITEMS} objects")
    if len(json.dumps(items)) > C.MAX_REQUEST_ITEMS_BYTES:
        raise ApiError(
            413,
            "too_large",
            f"'items' is at most {C.MAX_REQUEST_ITEMS_BYTES} bytes of JSON: index a list file",
        )
    return items


async def index(request: web.Request) -> web.Response:
    """A job for a URI or listed items (JSON), or for the image files of a multipart upload."""
    items: list[Any] | None = None
    if request.content_type.startswith("multipart/"):
        files, data = await read_form(request)
        if not files:
            raise ApiError(400, "bad_request", "a multipart index request needs at least one image file")
    else:
        files, data = [], await body_json(request)
        if "items" in data:
            items = _items(data)
        else:
            text_field(data, "uri", MAX_URI)
    pq = client(request, data.get("collection"))
    check_unique, near = flag(data.get("check_unique"), False), data.get("near_duplicate")
    if near is not None:
        try:
            near = float(near) if isinstance(near, (int, float, str)) and not isinstance(near, bool) else -1
        except ValueError:
            near = -1.0
        if not 0 <= near <= 2:  # a cosine distance (NaN fails this too)
            raise ApiError(400, "bad_request", "near_duplicate is a cosine distance from 0 to 2")
    if files:
        keys = _file_keys(files)
        keyed = {"uploads": keys} if keys else None
        uploads = [(f.name, f.data) for f in files]
        job = await blocking(pq.index_uploads, uploads, check_unique, near, keyed)
    elif items is not None:
        job = await blocking(pq.index_items, items, check_unique, near, origin="network")
    else:
        uri = data["uri"].strip()
        if "://" not in uri or uri.startswith("file://"):  # a local path; the workers check again
            refused = Sources(request.app[SETTINGS], origin="network").local_uri_error(uri)
            if refused:
                raise ApiError(403, "refused", refused)
        job = await blocking(pq.index, data["uri"], check_unique, near, origin="network")
    return web.json_response(
        {
            "job_id": job.id,
            "url": f"/v1/jobs/{job.id}",
            "files": len(files) or None,
            **({"items": len(items)} if items is not None else {}),
        },
        status=202,
    )


async def jobs(request: web.Request) -> web.Response:
    """The newest jobs first: what the web page shows as recent jobs."""
    from pupyl_queue.coordination import recent_jobs

    pq = client(request)
    _, limit = _page(request)
    named = request.query.get("collection")
    return web.json_response({"jobs": await blocking(recent_jobs, pq.redis, limit, named)})


async def job(request: web.Request) -> web.Response:
    pq = client(request)
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(404, "not_found", "no such job")
    handle = pq.job(job_id)
    try:
        state = await blocking(handle.progress)
        if state.get("state") not in C.JOB_ENDED and await blocking(handle.end_if_lost):
            state = await blocking(handle.progress)  # it had stalled with no task left: ended now
    except KeyError:
        raise ApiError(404, "not_found", "no such job (or it ended more than PUPYL_JOB_TTL ago)") from None
    offset, limit = _page(request)
    failures = await blocking(handle.failures) if state.get("batches_total") else []
    return web.json_response(
        {
            "job_id": handle.id,
            **state,
            "failures": failures[offset : offset + limit],
            "failures_total": len(failures),
        }
    )


def _page(request: web.Request) -> tuple[int, int]:
    offset = integer(request.query.get("offset"), "offset", 0, 0, 2**31)
    return offset, integer(request.query.get("limit"), "limit", 100, 1, 1000)


async def search(request: web.Request) -> web.Response:
    query: Any
    if request.content_type.startswith("multipart/"):
        files, options = await read_form(request)
        if len(files) != 1:
            raise ApiError(400, "bad_request", "a multipart search takes exactly one image file")
        query = files[0].data
    else:
        options = await body_json(request)
        if "id" in options:
            query = integer(options["id"], "id", None, 0, 2**63 - 1)
        elif "vector" in options:
            query = query_vector(options["vector"])
        elif "image_b64" in options:
            limit = request.app[SETTINGS].max_image_bytes * 4 // 3 + 4
            try:
                query = base64.b64decode(text_field(options, "image_b64", limit), validate=True)
            except binascii.Error:
                raise ApiError(400, "bad_request", "'image_b64' is not valid base64") from None
        elif "uri" in options:
            query = await blocking(read_uri, request.app[SETTINGS], text_field(options, "uri", MAX_URI))
        else:
            raise ApiError(
                400, "bad_request", "give an image (multipart), or JSON with uri, id, vector or image_b64"
            )
    pq = client(request, options.get("collection"))
    top = integer(options.get("top"), "top", 4, 1, 1000)
    metadata, distances = flag(options.get("metadata"), False), flag(options.get("distances"), True)
    mode = options.get("mode") or "similar"
    if mode not in C.SEARCH_MODES:
        raise ApiError(400, "bad_request", f"'mode' is one of {', '.join(C.SEARCH_MODES)}")
    if mode == "copy" and not isinstance(query, (bytes, int)):
        raise ApiError(
            400, "bad_request", "copy mode needs a query image (a file, a URI, image_b64 or an id)"
        )
    where = search_filter(options.get("filter", request.query.get("filter")))
    result = await blocking(pq.search_async, query, top, metadata, mode=mode, filter=where)
    if not flag(options.get("wait"), True):
        await blocking(pq.redis.set, Layout.task_key(result.id), "1", ex=pq.settings.result_expires)
        return web.json_response({"task_id": result.id, "url": f"/v1/tasks/{result.id}"}, status=202)
    answer = await blocking(wait_result, result, pq.settings.search_timeout)
    if not distances:
        for row in answer["results"]:
            row.pop("distance", None)
    return web.json_response(answer)


def search_filter(value: Any) -> dict[str, Any] | None:
    """A search's ``filter``: a JSON object (JSON body), or its JSON text (a form field, the query
    string); checked here so a bad one is a 400 with the reason, never a failed task."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ApiError(
                400, "bad_filter", '\'filter\' is a JSON object such as {"color": "red"}'
            ) from None
    try:
        parse_filter(value)
    except InvalidAttribute as exc:
        raise ApiError(400, "bad_filter", f"filter: {exc}") from None
    return value or None


def read_uri(settings: Settings, uri: str) -> bytes:
    """A query image named by the client: fetched through the SSRF guard, or a local file only
    under PUPYL_ALLOWED_ROOTS (checked before anything else, so nothing about other paths leaks).
    """
    if is_url(uri):
        try:
            return Fetcher(settings).fetch(uri, settings.max_image_bytes)
        except FetchRefused as exc:
            raise ApiError(403, "refused", str(exc)) from None
        except FetchError as exc:
            raise ApiError(422, "fetch_failed", str(exc)) from None
    if "://" in uri and not uri.startswith("file://"):
        raise ApiError(400, "bad_request", "'uri' is an http(s) URL or a path under the allowed roots")
    path = Path(uri.removeprefix("file://"))
    if not path.is_absolute():
        raise ApiError(403, "refused", OUTSIDE_ROOTS)
    try:
        fh, info = Sources(settings, origin="network").open_local(path)  # the roots first
    except LocalRefused as exc:
        if str(exc) == OUTSIDE_ROOTS:
            raise ApiError(403, "refused", OUTSIDE_ROOTS) from None
        raise ApiError(404, "not_found", f"no readable image file there: {exc}") from None
    with fh:
        if info.st_size > settings.max_image_bytes:
            raise ApiError(413, "too_large", "the file is larger than PUPYL_MAX_IMAGE_BYTES")
        return fh.read(settings.max_image_bytes + 1)


async def task(request: web.Request) -> web.Response:
    """A task this API queued (a search with ``wait: false``). Celery reports any unknown id as
    PENDING, like a queued task: the API remembers the ids it handed out, so others are a 404."""
    from celery.result import AsyncResult

    pq = client(request)
    task_id = request.match_info["task_id"]
    if not TASK_ID.fullmatch(task_id):
        raise ApiError(400, "bad_request", "a task id is a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    result = AsyncResult(task_id, app=pq.app)
    state = await blocking(lambda: result.state)
    if state == "PENDING" and not await blocking(pq.redis.exists, Layout.task_key(task_id)):
        raise ApiError(404, "not_found", "no such task (or its result has expired)")
    body: dict[str, Any] = {"task_id": result.id, "state": state}
    if state == "SUCCESS":
        body["result"] = await blocking(lambda: result.result)
    elif state == "FAILURE":
        body["error"] = str(await blocking(lambda: result.result))
    return web.json_response(body)


def _image_id(request: web.Request) -> int:
    text = request.match_info["image_id"]
    if not IMAGE_ID.fullmatch(text) or int(text) > 2**63 - 1:
        raise ApiError(400, "bad_request", "an image id is an integer from 0 to 2**63 - 1")
    return int(text)


async def _stored(request: web.Request, key: Callable[[Layout, int], str]) -> bytes:
    """One stored object of the image the path names; 404 when there is none."""
    pq = client(request)
    try:
        return await blocking(pq.store.get, key(Layout(pq.collection), _image_id(request)))
    except ObjectNotFound:
        raise ApiError(404, "not_found", "no such image") from None


async def image_meta(request: web.Request) -> web.Response:
    meta = await blocking(client(request).metadata, _image_id(request))
    if meta is None:
        raise ApiError(404, "not_found", "no such image")
    return web.json_response(meta)


async def image_file(request: web.Request) -> web.Response:
    return web.Response(body=await _stored(request, Layout.image), content_type="image/jpeg")


async def image_delete(request: web.Request) -> web.Response:
    pq = client(request)
    result = await blocking(pq.remove, _image_id(request))
    if not result.get("removed"):
        raise ApiError(404, "not_found", result.get("reason", "no such image"))
    return web.json_response(result)


def _key(request: web.Request) -> str:
    try:
        return check_key(request.match_info["key"])
    except InvalidAttribute as exc:
        raise ApiError(400, "bad_key", str(exc)) from None


def _key_answer(result: dict[str, Any], done: str) -> web.Response:
    """A key route's task result: 404 when the key names nothing, 409 when it moved on meanwhile."""
    if result.get(done):
        return web.json_response(result)
    reason = str(result.get("reason") or "no such key")
    raise ApiError(
        409 if "meanwhile" in reason else 404, "conflict" if "meanwhile" in reason else "not_found", reason
    )


async def key_lookup(request: web.Request) -> web.Response:
    """The image a caller's key names now: ``{"key", "id", "sequence", "sha256"}``."""
    pq = client(request)
    found = await blocking(pq.lookup, _key(request))
    if not found:
        raise ApiError(404, "not_found", "no image with this key")
    return web.json_response(found)


async def key_remove(request: web.Request) -> web.Response:
    pq = client(request)
    return _key_answer(await blocking(pq.remove, None, key=_key(request)), "removed")


async def key_attributes(request: web.Request) -> web.Response:
    """Replace a key's attributes (no re-embedding): JSON ``{"attributes": {...}}``."""
    key = _key(request)
    data = await body_json(request)
    if set(data) - {"attributes", "collection"} or "attributes" not in data:
        raise ApiError(400, "bad_request", 'the body is {"attributes": {...}}')
    pq = client(request, data.get("collection", request.query.get("collection")))
    try:
        if not isinstance(data["attributes"], dict):
            raise InvalidAttribute("attributes are a JSON object")
        attributes = check_attributes(data["attributes"])
    except InvalidAttribute as exc:
        raise ApiError(400, "bad_attributes", str(exc)) from None
    return _key_answer(await blocking(pq.set_attributes, key, attributes), "updated")


async def collections(request: web.Request) -> web.Response:
    pq = client(request)
    names = await blocking(pq.collections)
    return web.json_response({"collections": [await blocking(pq.describe, name) for name in names]})


async def collection_describe(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    pq = client(request, name)
    try:
        return web.json_response(await blocking(pq.describe, name))
    except LookupError:
        raise ApiError(404, "not_found", f"no collection {name!r}") from None


async def collection_delete(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    pq = client(request, name)
    try:
        result = await blocking(pq.delete_collection, name)
    except LookupError:
        raise ApiError(404, "not_found", f"no collection {name!r}") from None
    return web.json_response(result)


async def openapi(request: web.Request) -> web.Response:
    from api.openapi import document

    return web.json_response(document())


class Metrics:
    """Prometheus metrics of this API process and of the cluster it fronts."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pupyl_api_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pupyl_api_request_seconds", "HTTP latency", ["route"], registry=self.registry
        )
        self.queue = Gauge(
            "pupyl_queue_length", "Messages waiting per Celery queue", ["queue"], registry=self.registry
        )
        self.images = Gauge(
            "pupyl_images", "Images indexed per collection", ["collection"], registry=self.registry
        )
        self.jobs = Gauge(
            "pupyl_jobs", "Recent jobs (the newest 1,000) by state", ["state"], registry=self.registry
        )
        self.in_flight = Gauge(
            "pupyl_job_images_in_flight",
            "Images of running jobs not yet indexed, refused or failed",
            registry=self.registry,
        )
        self.tasks = TaskTimings()
        self.registry.register(self.tasks)


class TaskTimings:
    """Per-task run time histograms and outcomes, as every worker recorded them in Redis."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {}

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        seconds = HistogramMetricFamily("pupyl_task_seconds", "Run time of worker tasks", labels=["task"])
        outcomes = CounterMetricFamily("pupyl_task_runs", "Task runs by outcome", labels=["task", "state"])
        for task, stats in sorted(self.stats.items()):
            seconds.add_metric([task], stats["buckets"], stats["sum"])
            for state, count in sorted(stats["states"].items()):
                outcomes.add_metric([task, state], count)
        yield seconds
        yield outcomes


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = asyncio.get_running_loop().time()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.latency.labels(route).observe(asyncio.get_running_loop().time() - started)  # type: ignore[attr-defined]
        metrics.requests.labels(route, request.method, str(status)).inc()  # type: ignore[attr-defined]


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import generate_latest

    from pupyl_queue.catalog import list_collections
    from pupyl_queue.coordination import Coordinator, recent_jobs
    from pupyl_queue.telemetry import read_tasks

    m = request.app[METRICS]
    pq = request.app[CLIENT]  # open routes take no collection parameter

    def gather() -> bytes:
        for queue in C.QUEUES:
            m.queue.labels(queue).set(pq.redis.llen(queue))  # type: ignore[attr-defined]
        for name in list_collections(pq.store):
            m.images.labels(name).set(Coordinator(pq.redis, Layout(name)).image_count())  # type: ignore[attr-defined]
        by_state: dict[str, int] = dict.fromkeys(C.JOB_STATES, 0)
        in_flight = 0
        for job in recent_jobs(pq.redis, C.RECENT_JOBS_KEPT):
            by_state[str(job.get("state"))] = by_state.get(str(job.get("state")), 0) + 1
            if job.get("state") in ("expanding", "running"):
                counted = sum(int(job.get(k) or 0) for k in ("indexed", "duplicate", "failed"))
                in_flight += max(0, int(job.get("total") or 0) - counted)
        for state, count in by_state.items():
            m.jobs.labels(state).set(count)  # type: ignore[attr-defined]
        m.in_flight.set(in_flight)  # type: ignore[attr-defined]
        m.tasks.stats = read_tasks(pq.redis)  # type: ignore[attr-defined]
        return generate_latest(m.registry)  # type: ignore[attr-defined]

    return web.Response(body=await blocking(gather), content_type="text/plain")


async def page(request: web.Request) -> web.FileResponse:
    """The search page; it asks for the API token itself and keeps it in the tab's session storage."""
    return web.FileResponse(STATIC / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pq = request.app[CLIENT]  # open routes take no collection parameter
    checks: dict[str, str] = {}
    try:
        await blocking(pq.redis.ping)
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["redis"] = type(exc).__name__
    try:
        await blocking(pq.store.exists, "readyz-probe")
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["store"] = type(exc).__name__
    try:
        replies = await blocking(lambda: pq.app.control.ping(timeout=1.0))
        searchers = [name for reply in replies for name in reply if name.startswith("search")]
        checks["search_worker"] = "ok" if searchers else "none answering"
    except Exception as exc:  # noqa: BLE001
        checks["search_worker"] = type(exc).__name__
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


def make_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings.from_env()
    if settings.api_auth and not settings.api_tokens.strip():
        raise ValueError("PUPYL_API_TOKENS is empty: set tokens, or PUPYL_API_AUTH=false for local use only")
    app = web.Application(middlewares=[measure, errors, auth], client_max_size=settings.api_max_body)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[CLIENT] = PupylQueue(settings=settings)
    app.router.add_get("/", page)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_post("/v1/index", index)
    app.router.add_get("/v1/jobs", jobs)
    app.router.add_get("/v1/jobs/{job_id}", job)
    app.router.add_post("/v1/search", search)
    app.router.add_get("/v1/tasks/{task_id}", task)
    app.router.add_get("/v1/images/{image_id}", image_meta)
    app.router.add_get("/v1/images/{image_id}/file", image_file)
    app.router.add_delete("/v1/images/{image_id}", image_delete)
    app.router.add_get("/v1/keys/{key}", key_lookup)
    app.router.add_delete("/v1/keys/{key}", key_remove)
    app.router.add_put("/v1/keys/{key}/attributes", key_attributes)
    app.router.add_get("/v1/collections", collections)
    app.router.add_get("/v1/collections/{name}", collection_describe)
    app.router.add_delete("/v1/collections/{name}", collection_delete)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)

    async def close_client(app: web.Application) -> None:
        app[CLIENT].close()

    app.on_cleanup.append(close_client)
    return app


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(settings), host=settings.api_host, port=settings.api_port, access_log=None)
