"""A worker past PUPYL_WORKER_MAX_RSS_MB finishes its task, stops warmly and loses nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from tests.imagegen import encode, pattern
from tests.workers import Workers

pytestmark = pytest.mark.slow


def test_embed_worker_over_its_memory_bound_stops_after_the_task(
    redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/12")
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.jpg").write_bytes(encode(pattern(700 + seed), "JPEG"))
    normal = Workers(settings, tmp_path)
    bounded = Workers(settings.replace(worker_max_rss_mb=1), tmp_path)  # any TF worker is past 1 MiB
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    normal.start(C.QUEUE_INGEST, C.QUEUE_SEARCH, C.QUEUE_MAINTENANCE)
    bounded.start(C.QUEUE_EMBED)
    try:
        state = client.index(folder).wait(timeout=180)
        assert (state["indexed"], state["failed"]) == (3, 0)  # one batch: the task finished first
        embed = bounded.procs[C.QUEUE_EMBED]
        deadline = time.monotonic() + 60
        while embed.poll() is None:
            assert time.monotonic() < deadline, "the bounded worker did not stop"
            time.sleep(0.2)
        assert embed.returncode == 0  # a warm shutdown, not a crash
        log = (tmp_path / f"{C.QUEUE_EMBED}.log").read_text()
        assert "PUPYL_WORKER_MAX_RSS_MB=1: stopping" in log
        assert client.search(folder / "1.jpg", top=1, return_distances=True)[0][1] < 1e-4
    finally:
        client.close()
        normal.stop_all()
        bounded.stop_all()
