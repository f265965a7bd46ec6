"""The HTTP API's contract, without workers: OpenAPI document = routes, auth and error shapes, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
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
        (r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method not in ("HEAD", "*")
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
            text = await (await http.get("/metrics")).text()
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
