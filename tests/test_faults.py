"""Fault injection on the ingestion side (issue #10), with real processes only.

Real redis-server, real Celery worker processes, a real S3 server (moto_server)
and ~2,000 small real photos. Each test breaks one part in the middle of a bulk
job, then checks that the job completes and that every distinct image is
indexed exactly once: the job report, the committed segments, the image and
metadata objects, their sha256s and the search index all agree, and nothing
is left over in the store.

    worker death     kill -9 an embed worker mid-batch, ten times
    broker restart   stop redis-server (AOF on) mid-job and start it again
    store outage     the S3 server unreachable for 30 s mid-job
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.stack import free_port, start_redis, start_worker, stop
from tests.conftest import need_shared, s3_store
from tests.faults import (
    FLOWERS,
    RECEIVED,
    TcpProxy,
    assert_exactly_once,
    audit,
    count_retries,
    open_tasks,
    retry_countdowns,
    small_flowers,
)
from tests.workers import Workers

pytestmark = pytest.mark.slow

IMAGES = 2000  # distinct real photos
COPIES = 20  # plus exact copies of some of them: check_unique must refuse each once
KILLS = 10


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, str]]:
    need_shared(FLOWERS)
    folder = tmp_path_factory.mktemp("flowers") / "set"
    return folder, small_flowers(folder, IMAGES, copies=COPIES)


def base_settings(home: Path, redis_url: str, **changes: object) -> Settings:
    return Settings(data_dir=home / "data", redis_url=redis_url, batch_size=16, **changes)  # type: ignore[arg-type]


def figures(name: str, **values: object) -> None:
    """The figures a run gives (job time, faults, retries): printed for BENCHMARKS.md (pytest -s)."""
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def finish(client: PupylQueue, workers: Workers, job_id: str, timeout: float) -> dict[str, object]:
    job = client.job(job_id)
    try:
        return job.wait(timeout=timeout)
    except Exception:
        print(workers.logs())
        raise


def check(client: PupylQueue, files: dict[Path, str], job_id: str, state: dict[str, object]) -> None:
    job = client.job(job_id)
    distinct = len(set(files.values()))
    assert (state["total"], state["indexed"], state["duplicate"], state["failed"]) == (
        len(files),
        distinct,
        len(files) - distinct,
        0,
    ), state
    reports = job.report()
    assert len(reports) == len(files)
    assert Counter(Path(r["ref"]).name for r in reports) == Counter(p.name for p in files)
    found = audit(client.store, client.redis, client.collection, reports)
    assert_exactly_once(found, files, Layout(client.collection))


# --- worker death
def test_embed_worker_killed_mid_batch_ten_times(
    flowers: tuple[Path, dict[Path, str]],
    redis_url: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    folder, files = flowers
    # A killed worker's message comes back once unacknowledged for the visibility timeout:
    # short here so the test runs in minutes (production: hours, above the longest task).
    # Every image staged in the store, so a kill between a batch's commit and its cleanup shows too.
    settings = base_settings(
        tmp_path, redis_url.rsplit("/", 1)[0] + "/8", visibility_timeout=8, inline_item_bytes=0
    )
    workers = Workers(settings, tmp_path)
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    workers.start("ingest", "embed")
    workers.start_extra("embed")
    rng = random.Random(10)
    kills = 0
    killed: list[str] = []  # every task a killed worker held (running or prefetched): each must come back
    phases: Counter[str] = Counter()  # where in its batch each kill landed
    try:
        started = time.monotonic()
        job = client.index(folder, check_unique=True)
        spy = BatchSpy(client, settings, job.id)
        while kills < KILLS:
            assert time.monotonic() - started < 200, f"only {kills} kills before the job ended"
            assert job.progress()["state"] != "done", f"the job ended after {kills} kills"
            embeds = [n for n in workers.procs if n.startswith("embed")]
            held = {n: tasks for n in embeds if (tasks := open_tasks(log_of(workers, n)))}
            if not held:
                time.sleep(0.01)
                continue
            if kills % 2 == 0:
                # Every other kill: while a batch's images are being written (stored, not yet committed).
                found = next(((n, t) for n, tasks in held.items() for t in tasks if spy.writing(t)), None)
                if found is None:
                    time.sleep(0.005)
                    continue
                victim, task = found
                phase = "writing"
            else:
                # The others: anywhere early in a batch (fetch, decode, inference; model loading).
                victim = rng.choice(sorted(held))
                task = held[victim][0]  # its oldest open receipt: running, not waiting for a thread
                time.sleep(rng.uniform(0.01, 0.1))
                phase = "early"
            if task not in open_tasks(log_of(workers, victim)) or spy.finished(task):
                continue  # it finished meanwhile: not mid-batch
            os.kill(workers.procs[victim].pid, signal.SIGKILL)
            workers.procs.pop(victim).wait()
            kills += 1
            # Its log is final now: every task it had received and not finished died with it.
            killed += open_tasks(log_of(workers, victim))
            phases[phase] += 1
            name = f"embed-r{kills}"
            workers.procs[name] = start_worker("embed", settings, log_path=tmp_path / f"{name}.log")
        state = finish(client, workers, job.id, timeout=240)
        took = time.monotonic() - started
        workers.check_alive()
        check(client, files, job.id, state)
        received = Counter(
            t for path in tmp_path.glob("embed*.log") for t in RECEIVED.findall(path.read_text())
        )
        redelivered = sum(n - 1 for n in received.values())
        again = [t for t in killed if received[t] < 2]
        assert not again, f"killed batches not delivered again: {again}"
        assert_no_delivery_left(client)
        figures(
            "worker death",
            images=len(files),
            batches=state["batches_total"],
            kills=kills,
            **phases,
            tasks_held_by_killed=len(killed),
            redeliveries=redelivered,
            job_s=round(took, 1),
        )
    finally:
        client.close()
        workers.stop_all()


class BatchSpy:
    """Which batch a running embed task holds, and how far it got, read from Redis and the store."""

    def __init__(self, client: PupylQueue, settings: Settings, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.images = settings.data_dir / "store" / "collections" / client.collection / "images"
        self.coord = Coordinator(client.redis, Layout(client.collection))

    def batch(self, task_id: str) -> int | None:
        """The batch number: an embed task's id is its batch id (jobs.batch_id). Whether it runs
        is the ids it allocated (writing): embed tasks keep no STARTED state in the backend."""
        job_id, _, batch = task_id.rpartition("-")
        return int(batch) if job_id == self.job_id and batch.isdigit() else None

    def finished(self, task_id: str) -> bool:
        batch = self.batch(task_id)
        return batch is not None and self.coord.finished_batch(self.job_id, batch) is not None

    def writing(self, task_id: str) -> bool:
        """Some of the batch's images are in the store and the batch is not committed yet."""
        batch = self.batch(task_id)
        if batch is None:
            return False
        first = self.client.redis.hget(self.coord.layout.key(C.KEY_BATCH_IDS), f"{self.job_id}-{batch:06d}")
        if first is None or self.finished(task_id):
            return False
        segment = self.coord.layout.segment(f"{self.job_id}-{batch:06d}")
        if self.client.redis.hget(self.coord.layout.key(C.KEY_COMMIT_BY_OBJECT), segment) is not None:
            return False
        return any((self.images / f"{int(first) + i}.jpg").exists() for i in range(4))


def log_of(workers: Workers, name: str) -> str:
    path = workers.log_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- broker restart
def test_redis_restarted_mid_job(
    flowers: tuple[Path, dict[Path, str]], tiny_model: Path, tmp_path: Path
) -> None:
    """Two restarts of the broker (and coordination store): while expanding, then while embedding."""
    folder, files = flowers
    port = free_port()
    redis_dir = tmp_path / "redis"
    servers = [start_redis(redis_dir, port)]
    # Every image through the store's staging area: a re-expansion must not leave staged copies behind.
    settings = base_settings(tmp_path, f"redis://127.0.0.1:{port}/0", inline_item_bytes=0)
    workers = Workers(settings, tmp_path)
    client = PupylQueue(settings=settings, model=tiny_model)

    def restart_when(ready: Callable[[dict[str, Any]], bool], down_s: float = 3) -> dict[str, Any]:
        while not ready(progress := job.progress()):
            assert time.monotonic() - started < 120, progress
            time.sleep(0.02)
        client.redis.connection_pool.disconnect()
        stop(servers[-1])  # SIGTERM: redis-server writes out its AOF and exits
        time.sleep(down_s)
        servers.append(start_redis(redis_dir, port))  # same port and directory: the AOF is read back
        while True:
            try:
                client.redis.ping()
                break
            except redis.BusyLoadingError:  # still reading its AOF
                time.sleep(0.05)
        after = job.progress()
        for counter in ("total", "batches_done", "indexed", "duplicate"):
            assert int(after.get(counter) or 0) >= int(progress.get(counter) or 0), (counter, progress, after)
        return progress

    try:
        workers.start("ingest", "embed")
        started = time.monotonic()
        job = client.index(folder, check_unique=True)
        # First while expanding (the expansion runs again and stages and dispatches its batches twice;
        # tests/test_redelivery.py covers a batch finished in between), then while embedding.
        expanding = restart_when(
            lambda p: p["state"] == "running" or (p["state"] == "expanding" and int(p["total"]) >= 200)
        )
        embedding = restart_when(lambda p: int(p.get("batches_done") or 0) >= 60)
        state = finish(client, workers, job.id, timeout=240)
        took = time.monotonic() - started
        workers.check_alive()
        check(client, files, job.id, state)
        assert_no_delivery_left(client)
        received = len(RECEIVED.findall((tmp_path / "embed.log").read_text(errors="replace")))
        figures(
            "broker restart",
            images=len(files),
            batches=state["batches_total"],
            state_at_first_restart=expanding["state"],
            staged_at_first_restart=expanding["total"],
            batches_done_at_second_restart=embedding["batches_done"],
            embed_deliveries=received,
            waits_for_redis=state.get("retries", 0),
            job_s=round(took, 1),
        )
    finally:
        client.close()
        workers.stop_all()
        stop(servers[-1])


def assert_no_delivery_left(client: PupylQueue, timeout: float = 10) -> None:
    """No message is left unacknowledged in the broker, to come back after the visibility timeout."""
    deadline = time.monotonic() + timeout
    while client.redis.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [json.loads(v)[0]["headers"]["task"] for v in client.redis.hgetall("unacked").values()]
    assert not left, f"deliveries left unacknowledged: {left}"


# --- store outage
@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[TcpProxy]:
    host, port = s3_endpoint.split(":")
    proxy = TcpProxy((host, int(port)))
    yield proxy
    proxy.close()


OUTAGE_S = 30
STAGED_IMAGES = 1000  # each staged through S3 (a put, a get and a delete): half the set keeps the test short


def part_of(flowers: tuple[Path, dict[Path, str]], dest: Path, count: int) -> tuple[Path, dict[Path, str]]:
    """The first ``count`` distinct photos and every exact copy of them, hard-linked into ``dest``."""
    _, files = flowers
    originals = sorted((p for p in files if not p.name.startswith("copy")), key=lambda p: p.name)
    keep = {files[p] for p in originals[:count]}
    dest.mkdir()
    part = {}
    for path, sha in files.items():
        if sha in keep:
            os.link(path, dest / path.name)
            part[dest / path.name] = sha
    return dest, part


def test_s3_unreachable_for_30s_mid_job(
    flowers: tuple[Path, dict[Path, str]],
    redis_url: str,
    s3_proxy: TcpProxy,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    folder, files = part_of(flowers, tmp_path / "flowers", STAGED_IMAGES)
    settings = base_settings(
        tmp_path,
        redis_url.rsplit("/", 1)[0] + "/9",
        **s3_store(f"127.0.0.1:{s3_proxy.port}", f"s3://pupyl-faults/{tmp_path.name}"),
        inline_item_bytes=0,  # every image staged in S3: fetched by the embed task, deleted after its commit
    )
    workers = Workers(settings, tmp_path)
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    try:
        workers.start("ingest", "embed")
        started = time.monotonic()
        job = client.index(folder, check_unique=True)
        # While the expansion is still staging (its task retries), with embed tasks fetching beside it.
        while not ((p := job.progress())["state"] == "running" or int(p.get("total") or 0) >= 300):
            assert time.monotonic() - started < 120, p
            time.sleep(0.05)
        s3_proxy.down()
        down_at = job.progress()
        time.sleep(OUTAGE_S)
        during = job.progress()
        s3_proxy.up()
        assert during["state"] in ("expanding", "running"), during
        assert int(during["batches_done"]) <= int(down_at["batches_done"]) + 1  # the outage stopped it
        state = finish(client, workers, job.id, timeout=240)
        took = time.monotonic() - started
        workers.check_alive()
        check(client, files, job.id, state)
        logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log")))
        logged = count_retries(logs)
        assert logged > 0, "no Celery retry in the worker logs"
        countdowns = max(retry_countdowns(logs).values(), key=len)
        assert len(countdowns) >= 3, countdowns  # one task retried again and again, with backoff
        assert int(state.get("retries") or 0) == logged, (state, logged)
        assert "StoreUnavailable" in str(state.get("last_retry"))
        assert_no_delivery_left(client)
        figures(
            "store outage",
            images=len(files),
            batches=state["batches_total"],
            outage_s=OUTAGE_S,
            state_at_outage=down_at["state"],
            batches_done_at_outage=down_at["batches_done"],
            retries=state["retries"],
            most_retried_countdowns=countdowns,
            job_s=round(took, 1),
        )
    finally:
        client.close()
        workers.stop_all()
