"""A store outage longer than the retries, through real workers (issue #16, items 1 and 2).

Real redis-server, real Celery workers, a real S3 server (moto_server) behind a TCP proxy that
plays dead. The retry budget is set tiny (PUPYL_TASK_RETRIES=2, backoff at most 1 s), so the
outage outlasts it in seconds, as a 15-minute outage outlasts the default ten minutes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from pupyl_queue.client import JobFailed
from pupyl_queue.layout import Layout
from tests.conftest import s3_store
from tests.faults import TcpProxy
from tests.imagegen import encode, pattern
from tests.workers import Workers

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[TcpProxy]:
    host, port = s3_endpoint.split(":")
    proxy = TcpProxy((host, int(port)))
    yield proxy
    proxy.close()


def test_store_down_longer_than_the_retries_ends_the_job_and_frees_its_images(
    redis_url: str, s3_proxy: TcpProxy, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(6):
        (folder / f"{seed:02d}.png").write_bytes(encode(pattern(seed), "PNG"))
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + "/10",
        **s3_store(f"127.0.0.1:{s3_proxy.port}", f"s3://pupyl-job-end/{tmp_path.name}"),
        batch_size=4,
        inline_item_bytes=0,  # every image staged in S3: the embed tasks need the store from their start
        task_retries=2,
        task_retry_backoff_max=1,
    )
    workers = Workers(settings, tmp_path)
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    layout = Layout(client.collection)
    try:
        workers.start("ingest")
        job = client.index(folder, check_unique=True)
        deadline = time.monotonic() + 120
        while job.progress()["state"] != "running":  # expanded: every image staged, no batch run yet
            assert time.monotonic() < deadline, job.progress()
            time.sleep(0.1)
        s3_proxy.down()
        workers.start("embed")
        started = time.monotonic()
        with pytest.raises(
            JobFailed, match="4 of 4 batches failed: gave up after 2 retries: StoreUnavailable"
        ):
            job.wait(timeout=60)  # before the fix: "running" for ever
        took = time.monotonic() - started
        state = job.progress()
        assert (state["total"], state["indexed"], state["failed"], state["batches_failed"]) == (6, 0, 6, 4)
        failures = job.failures()  # from Redis: the store is still down
        assert sorted(Path(f["ref"]).name for f in failures) == sorted(p.name for p in folder.iterdir())
        assert all("StoreUnavailable" in f["error"] for f in failures)
        assert client.redis.hlen(layout.key(C.KEY_HASHES)) == 0, "claims of the failed batches are left"
        assert client.redis.hlen(layout.key(C.KEY_PENDING_CLAIMS)) == 0

        s3_proxy.up()
        from pupyl_queue.housekeeping import housekeep

        # The store was down when the job ended: its staged copies go with housekeeping's next round.
        assert list(client.store.list(layout.staging(job.id) + "/")), "nothing was staged?"
        housekeep(client.store, client.redis, settings, now=time.time() + settings.upload_grace + 1)
        assert list(client.store.list(layout.staging(job.id) + "/")) == [], "staged copies left behind"
        again = client.index(folder, check_unique=True)
        state = again.wait(timeout=180)
        assert (state["state"], state["indexed"], state["duplicate"]) == ("done", 6, 0)
        workers.check_alive()
        print(f"\n[job-end] store down: job failed after {took:.1f}s (retries=2, backoff max 1 s)")
    except Exception:
        print(workers.logs())
        raise
    finally:
        client.close()
        workers.stop_all()
