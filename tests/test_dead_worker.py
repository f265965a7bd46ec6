"""A killed worker's task is back on its queue in seconds, with the default visibility timeout (hours)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue
from pupyl_queue.stack import start_worker
from tests.conftest import SHARED_DATA, need_shared
from tests.faults import small_flowers
from tests.test_faults import base_settings, check, finish
from tests.workers import Workers
from workers.liveness import HOLDERS

pytestmark = pytest.mark.slow
ALIVE_S = 10  # PUPYL_WORKER_ALIVE_S: the sweep restores ~10 s after the kill (default 30 s: the same path)


def held(client: PupylQueue) -> list[str]:
    """Delivery tags of the tasks an embed worker holds now (the liveness record)."""
    return [t for t, host in client.redis.hgetall(HOLDERS).items() if host.startswith("embed")]


def restore_lines(logs: Path) -> list[str]:
    text = "".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
    return [line for line in text.splitlines() if "task(s) of dead workers" in line]


def test_killed_embed_workers_task_comes_back_without_waiting_hours(
    redis_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    need_shared(SHARED_DATA / "flowers")
    folder = tmp_path / "set"
    files = small_flowers(folder, 240, copies=4)
    settings = base_settings(
        tmp_path, redis_url.rsplit("/", 1)[0] + "/14", inline_item_bytes=0, worker_alive_s=ALIVE_S
    )
    assert settings.visibility_timeout >= 3600  # kombu alone would bring the task back in hours
    workers = Workers(settings, tmp_path)
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    workers.start("ingest", "embed")
    try:
        job = client.index(folder, check_unique=True)
        orphan, name = None, "embed"
        for attempt in range(3):  # until a kill lands while a task runs (its postrun never comes)
            deadline = time.monotonic() + 120
            while client.job(job.id).progress()["batches_done"] < 2 * (attempt + 1) or not held(client):
                assert time.monotonic() < deadline and client.job(job.id).progress()["state"] != "done"
                time.sleep(0.005)
            os.kill(workers.procs[name].pid, signal.SIGKILL)
            workers.procs.pop(name).wait()
            killed_at = time.monotonic()
            orphans = held(client)
            name = f"embed-{attempt + 2}"
            workers.procs[name] = start_worker("embed", settings, log_path=tmp_path / f"{name}.log")
            if orphans:
                orphan = orphans[0]
                break
        assert orphan, "no kill landed mid-task"
        state = finish(client, workers, job.id, timeout=120)
        took = time.monotonic() - killed_at
        check(client, files, job.id, state)
        # The job can finish first: a kill after the batch was counted, before its ack, leaves a
        # task that no batch waits for. The sweep restores it all the same (kombu alone: in 4 h).
        while not any(orphan in line for line in restore_lines(tmp_path)):
            assert time.monotonic() - killed_at < 90, restore_lines(tmp_path)
            time.sleep(0.5)
        print(f"\n[faults] dead worker: job done {took:.1f}s after the kill (visibility timeout 4 h)")
        assert took < 120
    finally:
        client.close()
        workers.stop_all()
