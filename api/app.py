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
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web

from pupyl_queue import constants as C
from pupyl_queue.client import PupylQueue, TaskFailed, wait_result
from pupyl_queue.layout import Layout, check_collection
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound

log = logging.getLogger(__name__)
CLIENTS = web.AppKey("clients", dict)
SETTINGS = web.AppKey("settings", Settings)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN = {"/healthz", "/readyz", "/v1/openapi.json", "/metrics"}
METRICS = web.AppKey("metrics", object)


class ApiError(web.HTTPException):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": {"code": code, "message": message}}), content_type="application/json"
        )


def client(request: web.Request, collection: str | None = None) -> PupylQueue:
    name = collection or request.query.get("collection") or C.DEFAULT_COLLECTION
    try:
        check_collection(name)
    except ValueError as exc:
        raise ApiError(400, "bad_collection", str(exc)) from None
    clients = request.app[CLIENTS]
    if name not in clients:
        clients[name] = PupylQueue(settings=request.app[SETTINGS], collection=name)
    return clients[name]


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
    except TimeoutError as exc:
        raise ApiError(504, "timeout", str(exc)) from None
    except (ValueError, LookupError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if settings.api_auth and request.path not in OPEN:
        tokens = [t.strip() for t in settings.api_tokens.split(",") if t.strip()]
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        valid = scheme.lower() == "bearer" and any(
            hmac.compare_digest(given.strip().encode(), t.encode()) for t in tokens
        )
        if not valid:
            raise ApiError(
                401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)"
            )
    return await handler(request)


async def body_json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return data


# --- routes
async def index(request: web.Request) -> web.Response:
    data = await body_json(request)
    uri = data.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ApiError(400, "bad_request", "'uri' (a string) is required")
    pq = client(request, data.get("collection"))
    job = await blocking(
        pq.index, uri, bool(data.get("check_unique", False)), data.get("near_duplicate"), origin="network"
    )
    return web.json_response({"job_id": job.id, "url": f"/v1/jobs/{job.id}"}, status=202)


async def job(request: web.Request) -> web.Response:
    pq = client(request)
    handle = pq.job(request.match_info["job_id"])
    try:
        state = await blocking(handle.progress)
    except KeyError:
        raise ApiError(404, "not_found", "no such job") from None
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
    try:
        offset, limit = int(request.query.get("offset", 0)), int(request.query.get("limit", 100))
    except ValueError:
        raise ApiError(400, "bad_request", "offset and limit must be integers") from None
    if offset < 0 or not 1 <= limit <= 1000:
        raise ApiError(400, "bad_request", "offset >= 0 and 1 <= limit <= 1000")
    return offset, limit


async def search(request: web.Request) -> web.Response:
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "file"):
            raise ApiError(400, "bad_request", "multipart search needs an 'image' file field")
        query: Any = upload.file.read()
        options: dict[str, Any] = {k: v for k, v in form.items() if k != "image"}
    else:
        options = await body_json(request)
        if "id" in options:
            query = int(options["id"])
        elif "vector" in options:
            import numpy as np

            query = np.asarray(options["vector"], dtype=np.float32)
        elif "image_b64" in options:
            query = base64.b64decode(options["image_b64"], validate=True)
        else:
            raise ApiError(
                400, "bad_request", "give an image (multipart), or JSON with id, vector or image_b64"
            )
    pq = client(request, options.get("collection"))
    top = int(options.get("top", 4))
    if not 1 <= top <= 1000:
        raise ApiError(400, "bad_request", "top must be between 1 and 1000")
    metadata = str(options.get("metadata", "false")).lower() in ("1", "true", "yes")
    result = await blocking(pq.search_async, query, top, metadata)
    if str(options.get("wait", "true")).lower() in ("0", "false", "no"):
        return web.json_response({"task_id": result.id, "url": f"/v1/tasks/{result.id}"}, status=202)
    answer = await blocking(wait_result, result, pq.settings.search_timeout)
    return web.json_response(answer)


async def task(request: web.Request) -> web.Response:
    from celery.result import AsyncResult

    pq = client(request)
    result = AsyncResult(request.match_info["task_id"], app=pq.app)
    state = await blocking(lambda: result.state)
    body: dict[str, Any] = {"task_id": result.id, "state": state}
    if state == "SUCCESS":
        body["result"] = await blocking(lambda: result.result)
    elif state == "FAILURE":
        body["error"] = str(await blocking(lambda: result.result))
    return web.json_response(body)


def _image_id(request: web.Request) -> int:
    try:
        return int(request.match_info["image_id"])
    except ValueError:
        raise ApiError(400, "bad_request", "image ids are integers") from None


async def _stored(request: web.Request, key: Callable[[Layout, int], str]) -> bytes:
    """One stored object of the image the path names; 404 when there is none."""
    pq = client(request)
    try:
        return await blocking(pq.store.get, key(Layout(pq.collection), _image_id(request)))
    except ObjectNotFound:
        raise ApiError(404, "not_found", "no such image") from None


async def image_meta(request: web.Request) -> web.Response:
    return web.json_response(json.loads(await _stored(request, Layout.image_meta)))


async def image_file(request: web.Request) -> web.Response:
    return web.Response(body=await _stored(request, Layout.image), content_type="image/jpeg")


async def image_delete(request: web.Request) -> web.Response:
    pq = client(request)
    result = await blocking(pq.remove, _image_id(request))
    if not result.get("removed"):
        raise ApiError(404, "not_found", result.get("reason", "no such image"))
    return web.json_response(result)


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
    request.app[CLIENTS].pop(name, None)
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
    from pupyl_queue.coordination import Coordinator

    m = request.app[METRICS]
    pq = client(request)

    def gather() -> None:
        for queue in C.QUEUES:
            m.queue.labels(queue).set(pq.redis.llen(queue))  # type: ignore[attr-defined]
        for name in list_collections(pq.store):
            m.images.labels(name).set(Coordinator(pq.redis, Layout(name)).image_count())  # type: ignore[attr-defined]

    await blocking(gather)
    return web.Response(body=generate_latest(m.registry), content_type="text/plain")  # type: ignore[attr-defined]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pq = client(request)
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
    app[CLIENTS] = {}
    app.router.add_post("/v1/index", index)
    app.router.add_get("/v1/jobs/{job_id}", job)
    app.router.add_post("/v1/search", search)
    app.router.add_get("/v1/tasks/{task_id}", task)
    app.router.add_get("/v1/images/{image_id}", image_meta)
    app.router.add_get("/v1/images/{image_id}/file", image_file)
    app.router.add_delete("/v1/images/{image_id}", image_delete)
    app.router.add_get("/v1/collections", collections)
    app.router.add_get("/v1/collections/{name}", collection_describe)
    app.router.add_delete("/v1/collections/{name}", collection_delete)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)

    async def close_clients(app: web.Application) -> None:
        for pq in app[CLIENTS].values():
            pq.close()

    app.on_cleanup.append(close_clients)
    return app


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(settings), host=settings.api_host, port=settings.api_port, access_log=None)
