"""A real aiohttp server on loopback, serving what the fetch tests need."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from pupyl_queue.stack import free_port


class LoopbackServer:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.fail_first: dict[str, int] = {}
        self.hits: dict[str, int] = defaultdict(int)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def add(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.files[name] = (data, content_type)
        return f"{self.base}/files/{name}"

    def app(self) -> web.Application:
        async def files(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            self.hits[name] += 1
            if self.hits[name] <= self.fail_first.get(name, 0):
                return web.Response(status=503, text="try later")
            if name not in self.files:
                raise web.HTTPNotFound()
            data, content_type = self.files[name]
            return web.Response(body=data, content_type=content_type)

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(request.query["to"])

        async def slow(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(float(request.query.get("seconds", "30")))
            return web.Response(text="late")

        async def endless_redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(f"/loop?n={int(request.query.get('n', 0)) + 1}")

        app = web.Application()
        app.router.add_get("/files/{name}", files)
        app.router.add_get("/redirect", redirect)
        app.router.add_get("/slow", slow)
        app.router.add_get("/loop", endless_redirect)
        return app


@contextmanager
def serve() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    with serve_app(server.app(), server.port):
        yield server


@contextmanager
def serve_app(app: web.Application, port: int) -> Iterator[None]:
    """Any aiohttp app on 127.0.0.1:port, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # do not wait for /slow
    ready = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        except BaseException as exc:  # e.g. the port taken meanwhile: say so, not "connection refused" later
            failed.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(30) or failed:
        why = failed or "no answer in 30 s"
        raise RuntimeError(f"the test server did not start on 127.0.0.1:{port}: {why}")
    try:
        yield
    finally:

        async def shutdown() -> None:
            await runner.cleanup()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # handlers still sleeping in /slow
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class ApiClient:
    """The HTTP API as a test calls it: JSON in, (status, JSON or bytes) out, errors included."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        auth: bool = True,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
                return response.status, json.loads(payload) if "json" in kind else payload
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_job(self, url: str, timeout: float = 180) -> dict[str, Any]:
        """Poll a job's URL until it is done or failed."""
        deadline = time.monotonic() + timeout
        while (state := self.call("GET", url)[1])["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        return state
