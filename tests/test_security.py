"""Security end to end: JSON on the wire, pickle refused, guards through the API, no secret in any log.

One stack with every secret set to a known value: a redis-server that requires a password, the S3
store (moto) with its keys, the API with a token, Flower with a password. Bad input goes in through
the HTTP API (not the library): an archive with ``../`` and absolute members and a decompression
bomb, SSRF URLs, a path outside the allowed roots. Then every log line of every process is searched
for every secret.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery
from PIL import Image

from api.app import make_app
from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from pupyl_queue.stack import free_port, redis_server_binary, start_flower, stop, wait_for_port
from tests.conftest import S3_SECRET_KEY, s3_store
from tests.httpserver import ApiClient, LoopbackServer, serve_app
from tests.imagegen import encode, pattern
from tests.logcapture import all_log_lines
from tests.workers import Workers

pytestmark = pytest.mark.slow
REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex
API_TOKEN = "api-token-" + uuid.uuid4().hex
FLOWER_PASSWORD = "flower-pw-" + uuid.uuid4().hex
SECRETS = (REDIS_PASSWORD, API_TOKEN, FLOWER_PASSWORD, S3_SECRET_KEY)
HOSTILE = "pickle"  # the serializer of the message the workers must refuse


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server that requires a password (set in its config file, not on its command line)."""
    home = tmp_path_factory.mktemp("locked-redis")
    port = free_port()
    conf = home / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\ndir {home}\nappendonly yes\nsave ""\n'
        f"requirepass {REDIS_PASSWORD}\nlogfile {home / 'redis.log'}\nloglevel verbose\n"
    )
    proc = subprocess.Popen([redis_server_binary(), str(conf)])
    try:
        wait_for_port(port, proc, "redis-server", log=home / "redis.log")
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0", home / "redis.log"
    finally:
        stop(proc)


def hostile_archive() -> bytes:
    """One good image, members escaping the folder, and a pixel bomb (tiny file, 400 Mpx)."""
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    members = {
        "good.jpg": encode(pattern(4242), "JPEG"),
        "../escape.jpg": encode(pattern(4243), "JPEG"),
        "/etc/absolute.jpg": encode(pattern(4244), "JPEG"),
        "bomb.png": bomb.getvalue(),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_secrets_wire_format_and_guards_through_the_api(
    locked_redis: tuple[str, Path],
    s3_endpoint: str,
    tmp_path: Path,
    tiny_model: Path,
    http_server: LoopbackServer,
) -> None:
    redis_url, redis_log = locked_redis
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        **s3_store(s3_endpoint, "s3://pupyl-security/store"),
        fetch_allow_networks="127.0.0.1/32",  # the loopback test server; nothing else private
        allowed_roots=str(tmp_path / "allowed"),
        api_tokens=API_TOKEN,
        flower_password=FLOWER_PASSWORD,
        flower_port=free_port(),
        model=str(tiny_model),
    )
    with pytest.raises(redis_lib.AuthenticationError):  # the broker really is locked
        redis_lib.Redis.from_url(redis_url.replace(REDIS_PASSWORD, "wrong")).ping()
    workers = Workers(settings, tmp_path)
    workers.start()
    flower = start_flower(settings, tmp_path / "flower.log")
    client = PupylQueue(settings=settings)
    port = free_port()
    api = ApiClient(f"http://127.0.0.1:{port}", API_TOKEN)
    try:
        with all_log_lines() as api_log, serve_app(make_app(settings), port):
            wait_for_port(settings.flower_port, flower, "flower", 60, tmp_path / "flower.log")
            url = http_server.add(f"hostile-{uuid.uuid4().hex}.tar", hostile_archive(), "application/x-tar")
            status, accepted = api.call("POST", "/v1/index", {"uri": url})
            assert status == 202
            state = api.wait_job(accepted["url"])
            assert state["state"] == "done" and state["indexed"] == 1, state  # the rest went on
            reasons = {item["ref"].rsplit("#", 1)[-1]: item["error"] for item in state["failures"]}
            assert "unsafe" in reasons["../escape.jpg"] or ".." in reasons["../escape.jpg"], reasons
            assert "/etc/absolute.jpg" in reasons, reasons
            assert "bomb" in reasons["bomb.png"].lower() or "pixels" in reasons["bomb.png"], reasons

            for hostile in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.jpg"):
                status, job = api.call("POST", "/v1/index", {"uri": hostile})
                refused = api.wait_job(job["url"])
                text = json.dumps(refused)
                assert "refused" in text and "private or local" in text, refused
                status, answer = api.call("POST", "/v1/search", {"uri": hostile})
                assert status == 403 and answer["error"]["code"] == "refused"
            status, refused = api.call("POST", "/v1/index", {"uri": str(tmp_path)})  # outside the roots
            assert status == 403 and "allowed roots" in refused["error"]["message"]  # refused before queueing
            status, answer = api.call("POST", "/v1/search", {"uri": str(tmp_path / "data" / "x.jpg")})
            assert status == 403

            # The wire: a task message as Redis holds it is JSON through and through. A shard queue
            # that no worker reads keeps the message for us to look at.
            client.app.send_task(C.TASK_SEARCH, kwargs={"collection": "default", "query": {"id": 1}},
                                 queue="search.shard99")  # fmt: skip
            raw = client.redis.lrange("search.shard99", 0, -1)[0]
            envelope = json.loads(raw)
            assert envelope["content-type"] == "application/json"
            assert envelope["properties"]["body_encoding"] == "utf-8"  # JSON text, no base64 of it
            args, kwargs, _ = json.loads(envelope["body"])
            assert kwargs["query"] == {"id": 1}
            results = [k for k in client.redis.scan_iter("celery-task-meta-*")]
            assert results and all(json.loads(client.redis.get(k))["status"] for k in results)

            # A pickled message, as a hostile producer would send it (this test only; nothing in
            # pupyl-queue sends or accepts one), is refused by the worker and never runs. The
            # producer is a plain Celery app: kombu's defaults (its body in base64), not ours.
            hostile = Celery(broker=client.settings.broker_url, backend=client.settings.broker_url)
            hostile.conf.broker_transport_options = {"priority_steps": [0]}
            pickled = hostile.send_task(
                C.TASK_SEARCH,
                kwargs={"collection": "default", "query": {"id": 1}},
                serializer=HOSTILE,
                queue=C.QUEUE_SEARCH,
            )
            deadline = time.monotonic() + 60
            while "untrusted content" not in (tmp_path / "search.log").read_text():
                assert time.monotonic() < deadline, workers.logs()
                time.sleep(0.2)
            assert pickled.state == "PENDING"
            hostile.close()
            workers.check_alive()
    finally:
        client.close()
        stop(flower)
        workers.stop_all()
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    logs["redis.log"] = redis_log.read_text(errors="replace")
    logs["api (this process)"] = api_log.text
    assert {"flower.log", "ingest.log", "embed.log", "search.log", "maintenance.log"} <= set(logs)
    assert api_log.seen > 0
    leaks = [(name, secret[:6]) for name, text in logs.items() for secret in SECRETS if secret in text]
    assert leaks == []
