"""The API's boundary against hostile clients (issue #19): what a token holder may read, what an
unauthenticated client may cost, and which inputs must be a JSON 4xx, not a 500.

No workers: every case here is answered at the edge (the API, or the expansion of a URI, which is the
code the ingest worker runs). A real redis-server backs the API; the HTTP peers are real servers.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import make_app
from pupyl_queue.fetch import Fetcher
from pupyl_queue.layout import Layout, check_collection
from pupyl_queue.queries import QueryError, _unit_vector
from pupyl_queue.settings import Settings
from pupyl_queue.sources import SourceError, SourceItem, Sources, fetch_pending
from pupyl_queue.stack import free_port
from tests.httpserver import serve_app
from tests.imagegen import encode, pattern

TOKEN = "boundary-token"
METRICS_TOKEN = "scraper-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
JPEG = encode(pattern(7), "JPEG")
OUTSIDE = "refused: local path outside the allowed roots (PUPYL_ALLOWED_ROOTS)"


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """Two allowed folders with an image each, and a folder beside them that is not allowed."""
    allowed, second, secret = tmp_path / "allowed", tmp_path / "second", tmp_path / "secret"
    for folder in (allowed, second, secret):
        folder.mkdir()
        (folder / f"{folder.name}-photo.jpg").write_bytes(JPEG)
    return {"allowed": allowed, "second": second, "secret": secret}


def network(roots: dict[str, Path], **changes: Any) -> Sources:
    settings = Settings(allowed_roots=f"{roots['allowed']},{roots['second']}", **changes)
    return Sources(settings, origin="network")


def expand(sources: Sources, uri: str) -> list[SourceItem]:
    return list(fetch_pending(sources.expand(uri), sources.fetcher, 1_000_000, window=8))


def by_name(items: list[SourceItem]) -> dict[str, str]:
    return {Path(i.ref.rsplit("#", 1)[-1]).name: (i.error or "ok") for i in items}


# --- 1. every path that reaches open() passes one check, whatever the source kind
@pytest.mark.parametrize(
    "pattern_of",
    [
        lambda r: f"{r['secret']}/secret*.jpg",
        lambda r: f"{r['secret']}/**/*.jpg",
        lambda r: f"file://{r['secret']}/secret-photo.jp?",
        lambda r: "/etc/pass[w]d",
        lambda r: "/etc/host*",
        lambda r: "/proc/self/envir?n",
        lambda r: f"{r['allowed']}/../secret/*.jpg",
        lambda r: f"{r['allowed']}/../secret",
    ],
)
def test_globs_outside_the_roots_are_refused_before_anything_is_listed(roots: dict[str, Path], pattern_of):
    uri = pattern_of(roots)
    with pytest.raises(SourceError) as refused:
        expand(network(roots), uri)
    message = str(refused.value)
    assert "refused" in message
    for leaked in ("secret-photo.jpg", "passwd", "hosts", "environ"):  # no listing of what matched
        assert leaked not in message.replace(uri, "")


def test_every_local_source_kind_is_checked_after_resolving_links(roots: dict[str, Path]) -> None:
    allowed, secret = roots["allowed"], roots["secret"]
    os.symlink(secret / "secret-photo.jpg", allowed / "link-out.jpg")  # a link inside a root, out of it
    os.symlink(secret, allowed / "dir-out")
    sources = network(roots)

    globbed = by_name(expand(sources, f"{allowed}/*.jpg"))
    assert globbed == {"allowed-photo.jpg": "ok", "link-out.jpg": OUTSIDE}
    deep = by_name(expand(sources, f"{allowed}/**/*.jpg"))
    assert deep["allowed-photo.jpg"] == "ok" and deep["secret-photo.jpg"] == OUTSIDE

    walked = by_name(expand(sources, str(allowed)))
    assert walked["allowed-photo.jpg"] == "ok" and "leads out" in walked["link-out.jpg"]

    listing = allowed / "list.txt"
    listing.write_text(f"allowed-photo.jpg\nlink-out.jpg\n{secret}/secret-photo.jpg\n{secret}/gone.jpg\n")
    listed = by_name(expand(sources, str(listing)))
    assert listed["allowed-photo.jpg"] == "ok"
    assert listed["link-out.jpg"].startswith(OUTSIDE)
    # outside the roots, a file that exists and one that does not get the same answer (item 2)
    assert listed["secret-photo.jpg"] == listed["gone.jpg"].replace(":4", ":3")
    assert listed["secret-photo.jpg"].startswith(OUTSIDE)

    archive = secret / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(secret / "secret-photo.jpg", "inside.jpg")
    os.symlink(archive, allowed / "archive-link.tar")
    with pytest.raises(SourceError, match="outside the allowed roots"):
        expand(sources, str(allowed / "archive-link.tar"))
    with pytest.raises(SourceError, match="outside the allowed roots"):
        expand(sources, str(archive))
    assert by_name(expand(Sources(Settings(), origin="local"), str(archive))) == {"inside.jpg": "ok"}


def test_outside_the_roots_one_answer_whether_the_path_exists_or_not(roots: dict[str, Path]) -> None:
    sources = network(roots)
    answers = set()
    for uri in (roots["secret"] / "secret-photo.jpg", roots["secret"] / "gone.jpg", "/no/such/dir"):
        with pytest.raises(SourceError) as refused:
            expand(sources, str(uri))
        answers.add(str(refused.value).replace(str(uri), "<uri>"))
    assert answers == {f"<uri>: {OUTSIDE}"}


# --- 7. only regular files are read: a named pipe must not hang the ingest worker
@pytest.mark.timeout(30)
def test_named_pipes_are_failed_items_not_a_hang(roots: dict[str, Path]) -> None:
    allowed = roots["allowed"]
    os.mkfifo(allowed / "p.jpg")
    sources = network(roots)
    walked = by_name(expand(sources, str(allowed)))
    assert walked["allowed-photo.jpg"] == "ok" and "named pipe" in walked["p.jpg"]
    globbed = by_name(expand(sources, f"{allowed}/*.jpg"))
    assert "named pipe" in globbed["p.jpg"]
    listing = allowed / "list.txt"
    listing.write_text("p.jpg\nallowed-photo.jpg\n")
    listed = by_name(expand(sources, str(listing)))
    assert "named pipe" in listed["p.jpg"] and listed["allowed-photo.jpg"] == "ok"
    with pytest.raises(SourceError, match="named pipe"):
        expand(sources, str(allowed / "p.jpg"))
    assert "character device" in by_name(expand(Sources(Settings(), origin="local"), "/dev/nul?"))["null"]


# --- 6 and 10. one bad line is one failed item, and a malformed URL is not retried
def test_malformed_urls_in_a_list_are_failed_items(tmp_path: Path) -> None:
    async def bad_location(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://[::1/x"})

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/bad-redirect", bad_location)
    app.router.add_get("/ok.jpg", image)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"http://[::1/x\nhttp://example.org:99999999/x.jpg\n{base}/bad-redirect\n{base}/ok.jpg\n"
    )
    settings = Settings(fetch_allow_networks="127.0.0.1/32", fetch_retries=3, fetch_connect_timeout=2.0)
    with serve_app(app, port):
        sources = Sources(settings, origin="local")
        items = expand(sources, str(listing))
        results = Fetcher(settings).fetch_many(["http://[::1/x", f"{base}/bad-redirect"], 1000)
    outcome = {i.ref: i.error or "ok" for i in items}
    assert outcome[f"{base}/ok.jpg"] == "ok"
    assert "malformed URL" in outcome["http://[::1/x"]
    assert "malformed URL" in outcome["http://example.org:99999999/x.jpg"]
    assert "malformed redirect Location" in outcome[f"{base}/bad-redirect"]
    assert [r.attempts for r in results] == [1, 1]  # failed at once, not after 4 tries


def test_ssrf_refusal_does_not_echo_the_resolved_address() -> None:
    result = Fetcher(Settings(fetch_retries=0)).fetch_many(["http://localhost:9/x.jpg"], 1000)[0]
    assert result.error.startswith("refused: localhost resolves to a private or local address")
    assert "127.0.0.1" not in result.error and "::1" not in result.error


# --- 5 and 10: names and keys are matched whole; query vectors are normalized in float64
@pytest.mark.parametrize("name", ["default\n", "default\r", "a\nb", " default", "Default"])
def test_collection_names_are_matched_whole(name: str) -> None:
    with pytest.raises(ValueError, match="invalid collection name"):
        check_collection(name)


def test_tiny_query_vectors_keep_their_direction() -> None:
    tiny = _unit_vector([1e-30] * 255 + [2e-30], 256)
    assert np.isclose(np.linalg.norm(tiny), 1.0) and tiny[-1] > tiny[0] > 0
    assert np.isclose(_unit_vector([1e308] * 4, 4), 0.5).all()
    for hopeless in ([0.0] * 4, [float("nan")] * 4, [{}] * 4):
        with pytest.raises(QueryError):
            _unit_vector(hopeless, 4)


# --- through the API
def app_settings(tmp_path: Path, redis_url: str, roots: dict[str, Path], **changes: Any) -> Settings:
    return Settings(  # type: ignore[arg-type]
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        api_tokens=TOKEN,
        metrics_tokens=METRICS_TOKEN,
        allowed_roots=f"{roots['allowed']},{roots['second']}",
        **changes,
    )


def run(settings: Settings, scenario: Any) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(settings))) as http:
            await scenario(http)

    asyncio.run(main())


async def status_and_error(response: Any) -> tuple[int, dict[str, Any]]:
    body = await response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return response.status, body["error"]


def test_inputs_that_gave_500_are_json_4xx(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    long_path = roots["allowed"] / ("x" * 300 + ".jpg")

    async def scenario(http: TestClient) -> None:
        cases: list[tuple[str, str, Any, int]] = [
            ("GET", "/v1/images/" + "9" * 251, None, 400),
            ("GET", "/v1/images/" + "9" * 251 + "/file", None, 400),
            ("GET", f"/v1/images/{2**63}", None, 400),
            ("DELETE", "/v1/images/" + "9" * 4000, None, 400),
            ("GET", "/v1/images/+1", None, 400),
            ("GET", "/v1/images/1_0", None, 400),
            ("GET", "/v1/images/" + "\u0661\u0662", None, 400),  # Arabic-Indic digits
            ("POST", "/v1/search", {"vector": {}}, 400),
            ("POST", "/v1/search", {"vector": {"a": 1}}, 400),
            ("POST", "/v1/search", {"vector": [1, {}]}, 400),
            ("POST", "/v1/search", {"vector": [True, 1.0]}, 400),
            ("POST", "/v1/search", {"vector": [0.0, 0.0]}, 400),
            ("POST", "/v1/search", {"vector": None}, 400),
            ("POST", "/v1/search", {"uri": str(long_path)}, 404),
            ("POST", "/v1/search", {"uri": None}, 400),
            ("POST", "/v1/search", {"image_b64": None}, 400),
            ("POST", "/v1/search", {"image_b64": "not base64!"}, 400),
            ("POST", "/v1/search", {"id": None}, 400),
            ("POST", "/v1/search", {"id": "+1"}, 400),
            ("POST", "/v1/index", {"uri": None}, 400),
            ("POST", "/v1/index", {"uri": 5}, 400),
            ("POST", "/v1/search", {"vector": [0.5] * 8, "mode": "copy"}, 400),
            ("POST", "/v1/search", {"id": 1, "mode": "exact"}, 400),
            ("GET", "/v1/tasks/not-a-uuid", None, 400),
            ("GET", f"/v1/tasks/{uuid.uuid4()}", None, 404),
            ("GET", "/v1/jobs/" + "j" * 500, None, 404),
            ("GET", "/v1/jobs?collection=default%0A", None, 400),
            ("GET", "/v1/collections/default%0A", None, 400),
            ("GET", "/v1/keys/" + "k" * 300, None, 400),
            ("GET", "/v1/keys/a%00b", None, 400),
            ("DELETE", "/v1/keys/a%7Fb", None, 400),
            ("PUT", "/v1/keys/k/attributes", {"attributes": {"id": 1}}, 400),
            ("PUT", "/v1/keys/k/attributes", {"attributes": [1]}, 400),
            ("PUT", "/v1/keys/k/attributes", None, 400),
            ("POST", "/v1/search", {"id": 1, "filter": {"a": {"near": 1}}}, 400),
            ("POST", "/v1/search", {"id": 1, "filter": "{"}, 400),
            ("POST", "/v1/index", {"items": 5}, 400),
            ("POST", "/v1/index", {"items": [{"uri": "x"}] * 1001}, 400),
        ]
        for method, path, body, expected in cases:
            response = await http.request(method, path, json=body, headers=GOOD)
            status, error = await status_and_error(response)
            assert status == expected, (method, path[:60], body, status, error)
            assert "Errno" not in error["message"] and "OSError" not in error["message"], error

    run(app_settings(tmp_path, redis_url, roots), scenario)


def test_key_routes_need_a_token(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    async def scenario(http: TestClient) -> None:
        for method, path in (
            ("GET", "/v1/keys/k"),
            ("DELETE", "/v1/keys/k"),
            ("PUT", "/v1/keys/k/attributes"),
        ):
            status, error = await status_and_error(await http.request(method, path, json={"attributes": {}}))
            assert (status, error["code"]) == (401, "unauthorized"), (method, path)

    run(app_settings(tmp_path, redis_url, roots), scenario)


def test_index_and_search_by_path_stay_in_the_roots(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    async def scenario(http: TestClient) -> None:
        secret = roots["secret"]
        for uri in (f"{secret}/secret*.jpg", "/etc/pass[w]d", f"{roots['allowed']}/../secret", str(secret)):
            status, error = await status_and_error(
                await http.post("/v1/index", json={"uri": uri}, headers=GOOD)
            )
            assert status == 403 and error["message"].startswith("refused"), (uri, error)
        for uri in (secret / "secret-photo.jpg", secret / "gone.jpg"):
            status, error = await status_and_error(
                await http.post("/v1/search", json={"uri": str(uri)}, headers=GOOD)
            )
            assert (status, error["message"]) == (403, OUTSIDE)
        os.mkfifo(roots["allowed"] / "pipe.jpg")
        status, error = await status_and_error(
            await http.post("/v1/search", json={"uri": str(roots["allowed"] / "pipe.jpg")}, headers=GOOD)
        )
        assert status == 404 and "named pipe" in error["message"]
        accepted = await http.post("/v1/index", json={"uri": f"{roots['second']}/*.jpg"}, headers=GOOD)
        assert accepted.status == 202

    run(app_settings(tmp_path, redis_url, roots), scenario)


def test_unknown_tasks_are_404_and_known_ones_pending(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    async def scenario(http: TestClient) -> None:
        queued = await http.post("/v1/search", json={"vector": [0.5] * 8, "wait": False}, headers=GOOD)
        assert queued.status == 202
        task_id = (await queued.json())["task_id"]
        known = await http.get(f"/v1/tasks/{task_id}", headers=GOOD)
        assert known.status == 200 and (await known.json())["state"] == "PENDING"
        unknown = await http.get(f"/v1/tasks/{uuid.uuid4()}", headers=GOOD)
        assert unknown.status == 404

    run(app_settings(tmp_path, redis_url, roots), scenario)
    assert redis_client.ttl(Layout.task_key("x")) == -2  # nothing for ids never handed out


def test_metrics_need_a_token_and_name_no_collection_to_strangers(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    async def scenario(http: TestClient) -> None:
        assert (await http.get("/metrics")).status == 401
        assert (await http.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
        scraped = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status == 200 and "pupyl_queue_length" in await scraped.text()
        assert (await http.get("/metrics", headers=GOOD)).status == 200
        # the metrics token opens /metrics only
        assert (
            await http.get("/v1/jobs", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        ).status == 401

    run(app_settings(tmp_path, redis_url, roots), scenario)


def test_many_collection_names_leave_descriptors_and_redis_connections_flat(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    """Item 3: each new name once kept a client with its own Redis pool, for good."""
    me = psutil.Process()

    async def scenario(http: TestClient) -> None:
        async def burst(start: int) -> None:
            for n in range(start, start + 150):
                name = f"probe-{n}"
                await http.get(f"/readyz?collection={name}") if n % 50 == 0 else None
                await http.get(f"/v1/jobs?collection={name}", headers=GOOD)
                await http.get(f"/v1/collections/{name}", headers=GOOD)
                await http.get(f"/metrics?collection={name}", headers=GOOD)

        await burst(0)  # warm: the app's one pool, executor threads
        files, connections = me.num_fds(), len(redis_client.client_list())
        await burst(1000)
        assert me.num_fds() <= files + 4
        assert len(redis_client.client_list()) <= connections + 4
        assert redis_client.keys("pupyl:probe-*") == []  # asking about a name creates nothing

    run(app_settings(tmp_path, redis_url, roots), scenario)


def test_the_job_view_ends_a_job_whose_tasks_are_gone(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, roots: dict[str, Path]
) -> None:
    """A lost job (no task queued or held, no progress for PUPYL_JOB_STALL_S) must not show ``running``
    for good where no beat runs the sweep (``pupyl-queue up``): the job view ends it."""
    from pupyl_queue.coordination import Coordinator

    Coordinator(redis_client, Layout("default")).create_job(
        "lostjob", {"collection": "default", "state": "queued", "created_at": 0}
    )

    async def scenario(http: TestClient) -> None:
        body = await (await http.get("/v1/jobs/lostjob", headers=GOOD)).json()
        assert body["state"] == "failed" and "lost" in body["error"], body

    run(app_settings(tmp_path, redis_url, roots, job_stall_s=0), scenario)
