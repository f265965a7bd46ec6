"""The HTTP API's contract, without workers: OpenAPI document = routes, auth and error shapes, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_urldispatcher import StaticResource
from openapi_spec_validator import validate

from api.app import make_app
from api.openapi import document
from pupyl_queue.settings import Settings

TOKEN = "s3cret-api-token"


def settings(tmp_path: Path, redis_url: str, **changes: object) -> Settings:
    return Settings(data_dir=tmp_path, redis_url=redis_url, api_tokens=TOKEN, **changes)  # type: ignore[arg-type]


def test_openapi_document_is_valid_and_matches_the_routes(tmp_path: Path, redis_url: str) -> None:
    spec = document()
    validate(spec)
    app = make_app(settings(tmp_path, redis_url))
    routes = {
        (r.resource.canonical, r.method.lower())
        for r in app.router.routes()
        if r.method not in ("HEAD", "*") and not isinstance(r.resource, StaticResource)  # the page's files
    }
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented


def test_refuses_to_start_without_tokens(tmp_path: Path, redis_url: str) -> None:
    with pytest.raises(ValueError, match="PUPYL_API_TOKENS is empty"):
        make_app(Settings(data_dir=tmp_path, redis_url=redis_url))
    make_app(Settings(data_dir=tmp_path, redis_url=redis_url, api_auth=False))  # explicitly open


def test_auth_errors_and_metrics(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        app = make_app(settings(tmp_path, redis_url, api_max_body=1024))
        async with TestClient(TestServer(app)) as http:
            assert (await http.get("/healthz")).status == 200
            assert (await http.get("/v1/openapi.json")).status == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                response = await http.get("/v1/images/1", headers=headers)
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "unauthorized"
            good = {"Authorization": f"Bearer {TOKEN}"}
            missing = await http.get("/v1/images/12345", headers=good)
            assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
            bad_id = await http.get("/v1/images/abc", headers=good)
            assert bad_id.status == 400
            no_uri = await http.post("/v1/index", json={"check_unique": True}, headers=good)
            assert no_uri.status == 400 and "uri" in (await no_uri.json())["error"]["message"]
            too_big = await http.post("/v1/index", data=b"x" * 5000, headers=good)
            assert too_big.status == 413 and "error" in await too_big.json()
            wrong_method = await http.put("/v1/search", headers=good)
            assert wrong_method.status == 405
            assert (await http.get("/metrics")).status == 401  # it names every collection
            text = await (await http.get("/metrics", headers=good)).text()
            assert (
                'pupyl_api_requests_total{method="GET",route="/v1/images/{image_id}",status="401"} 3.0'
                in text
            )
            assert 'pupyl_queue_length{queue="embed"}' in text
            assert TOKEN not in text

    asyncio.run(scenario())


def test_collections_through_the_api(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, tiny_model: Path
) -> None:
    from pupyl_queue.runtime import Runtime
    from tests.imagegen import encode, pattern
    from tests.indexing import index_folder

    config = settings(tmp_path, redis_url)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    index_folder(Runtime(config), folder, tiny_model, "apitest")

    async def scenario() -> None:
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with TestClient(TestServer(make_app(config))) as http:
            listed = await (await http.get("/v1/collections", headers=good)).json()
            assert [(c["name"], c["images"]) for c in listed["collections"]] == [("apitest", 3)]
            assert (await (await http.get("/v1/collections/apitest", headers=good)).json())["dim"] == 256
            assert (await http.get("/v1/collections/Bad..Name", headers=good)).status == 400
            deleted = await http.delete("/v1/collections/apitest", headers=good)
            assert deleted.status == 200 and (await deleted.json())["deleted_objects"] > 0
            assert (await http.get("/v1/collections/apitest", headers=good)).status == 404

    asyncio.run(scenario())


def test_uploads_jobs_page_and_task_metrics(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Multipart uploads land in the store under their job; limits hold; the page needs no token."""
    from aiohttp import FormData

    from pupyl_queue import telemetry
    from pupyl_queue.layout import Layout
    from pupyl_queue.store import open_store
    from tests.imagegen import encode, pattern

    config = settings(tmp_path, redis_url, max_image_bytes=20_000, api_max_body=50_000)
    small = [encode(pattern(seed), "JPEG") for seed in range(2)]
    assert all(len(data) < 20_000 for data in small)
    telemetry.record_task(redis_client, "pupyl.embed", 0.07, "SUCCESS")
    telemetry.record_task(redis_client, "pupyl.embed", 3.0, "RETRY")

    def form(*files: tuple[str, bytes], **fields: str) -> FormData:
        data = FormData(quote_fields=False, default_to_multipart=True)  # raw names, as browsers send
        for name, content in files:
            data.add_field("files", content, filename=name, content_type="image/png")
        for key, value in fields.items():
            data.add_field(key, value)
        return data

    async def scenario() -> None:
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with TestClient(TestServer(make_app(config))) as http:
            page = await http.get("/")
            assert page.status == 200 and "<title>pupyl-queue</title>" in await page.text()
            assert (await http.get("/static/app.js")).status == 200
            from yarl import URL

            escape = await http.get(URL("/static/..%2Fapp.py", encoded=True))
            assert escape.status in (403, 404) and "ApiError" not in await escape.text()

            accepted = await http.post(
                "/v1/index",
                data=form(("a b.png", small[0]), ("../c.png", small[1]), check_unique="true"),
                headers=good,
            )
            assert accepted.status == 202, await accepted.text()
            job_id = (await accepted.json())["job_id"]
            keys = list(open_store(config).list(Layout().uploads(job_id) + "/"))
            assert [k.rsplit("/", 1)[1] for k in keys] == ["000000-a_b.png", "000001-c.png"]
            listed = await (await http.get("/v1/jobs", headers=good)).json()
            assert [j["job_id"] for j in listed["jobs"]] == [job_id]
            assert listed["jobs"][0]["uri"] == f"upload:{job_id}"

            huge = await http.post("/v1/index", data=form(("big.png", b"x" * 20_001)), headers=good)
            assert huge.status == 413 and (await huge.json())["error"]["code"] == "too_large"
            many = await http.post("/v1/index", data=form(*[("s.png", b"y" * 19_000)] * 3), headers=good)
            assert many.status == 413
            empty = await http.post("/v1/index", data=form(collection="default"), headers=good)
            assert empty.status == 400 and "image file" in (await empty.json())["error"]["message"]

            outside = await http.post("/v1/search", json={"uri": str(tmp_path / "x.jpg")}, headers=good)
            assert outside.status == 403 and "allowed roots" in (await outside.json())["error"]["message"]
            private = await http.post(
                "/v1/search", json={"uri": "http://169.254.169.254/x.jpg"}, headers=good
            )
            assert private.status == 403 and (await private.json())["error"]["code"] == "refused"
            bad_vector = await http.post("/v1/search", json={"vector": ["a"]}, headers=good)
            assert bad_vector.status == 400

            text = await (await http.get("/metrics", headers=good)).text()
            assert 'pupyl_task_seconds_bucket{le="0.1",task="pupyl.embed"} 1.0' in text
            assert 'pupyl_task_seconds_bucket{le="+Inf",task="pupyl.embed"} 2.0' in text
            assert 'pupyl_task_runs_total{state="RETRY",task="pupyl.embed"} 1.0' in text
            assert 'pupyl_jobs{state="queued"} 1.0' in text

    asyncio.run(scenario())
