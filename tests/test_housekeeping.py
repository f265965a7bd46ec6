"""Housekeeping: job records expire after their job ends, cut-off uploads and stale query images go.

Real redis-server, real stores (a local directory and S3 on moto_server), real Celery workers for
the maintenance task. ``now`` is passed in to stand for "the grace time has passed" (no sleeping).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pupyl_queue import PupylQueue
from pupyl_queue import constants as C
from pupyl_queue.client import JobFailed
from pupyl_queue.coordination import Coordinator, read_job, recent_jobs
from pupyl_queue.embedding import embed_batch
from pupyl_queue.housekeeping import expire_ended_jobs, forget_batch_ids, housekeep
from pupyl_queue.ingest import expand_job
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings, SettingsError
from pupyl_queue.store import LocalStore, ObjectStore
from tests.conftest import s3_store
from tests.imagegen import encode, pattern
from tests.workers import Workers

LAYOUT = Layout()


class Killed(BaseException):
    """The uploading process dies here (kill -9): none of its code runs after this point."""


@pytest.fixture(params=["file", "s3"])
def settings(
    request: pytest.FixtureRequest, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> Settings:
    base = Settings(data_dir=tmp_path, redis_url=redis_url, inline_limit=16, inline_item_bytes=0)
    if request.param == "file":
        return base
    return base.replace(
        **s3_store(request.getfixturevalue("s3_endpoint"), f"s3://hk-{uuid.uuid4().hex[:8]}/p"),
    )


@pytest.fixture
def pq(settings: Settings) -> Iterator[PupylQueue]:
    client = PupylQueue(settings=settings)
    yield client
    client.close()


def images(count: int) -> list[tuple[str, bytes]]:
    return [(f"{n}.png", encode(pattern(n), "PNG")) for n in range(count)]


def job_folders(store: ObjectStore) -> set[str]:
    """Job ids that still have an uploads/ or staging/ folder (on a local store, even an empty one)."""
    return {
        job_id
        for folder in (C.STORE_UPLOADS, C.STORE_STAGING)
        for job_id in store.children(f"{LAYOUT.root}/{folder}")
    }


def later(settings: Settings) -> float:
    """A moment past every grace time."""
    return time.time() + max(settings.upload_grace, settings.query_ttl) + 1


def newest_job(pq: PupylQueue) -> dict[str, object]:
    jobs = recent_jobs(pq.redis, 1)
    assert jobs, "no job recorded"
    return jobs[0]


# --- job records: a TTL once the job ends


def test_a_finished_job_expires_leaves_no_folder_and_keeps_its_report(
    settings: Settings, tiny_model: Path
) -> None:
    pq = PupylQueue(settings=settings, model=tiny_model)
    job = pq.index_uploads(images(3))
    rt = Runtime(settings)
    request = {
        "job_id": job.id,
        "collection": "default",
        "uri": C.UPLOAD_SCHEME + job.id,
        "model": str(tiny_model),
    }
    batches: list[dict[str, object]] = []
    expand_job(rt, {**request, "origin": "network"}, batches.append)
    assert job_folders(pq.store) == {job.id}  # its uploads and staged bytes, while it runs
    for batch in batches:
        embed_batch(rt, batch)
    assert job.progress()["state"] == "done"

    key = LAYOUT.job_key(job.id)
    for name in (key, key + ":batches"):
        assert 0 < pq.redis.ttl(name) <= settings.job_ttl, name  # was -1: kept for good
    assert job_folders(pq.store) == set()  # no empty uploads/<job>/ or staging/<job>/ left behind
    if isinstance(pq.store, LocalStore):
        assert not (pq.store.root / LAYOUT.uploads(job.id)).exists()
        assert not (pq.store.root / LAYOUT.staging(job.id)).exists()

    pq.redis.delete(key, key + ":batches")  # what the TTL does, days later
    assert [item["status"] for item in job.report()] == ["indexed"] * 3  # the report stays in the store
    pq.close()


def test_ended_jobs_without_a_ttl_get_one(redis_client: redis.Redis) -> None:
    """Jobs that ended before this (or by a path that missed expire_job) get their TTL from the sweep."""
    coord = Coordinator(redis_client, LAYOUT)
    coord.create_job("old-done", {"state": "done", "collection": "default"})
    coord.create_job("old-failed", {"state": "failed", "collection": "default", "error": "x"})
    coord.create_job("live", {"state": "running", "collection": "default"})
    coord.finish_batch("live", 0, {"indexed": 1, "duplicate": 0, "failed": 0})
    redis_client.hset(LAYOUT.job_key("gone") + ":batches", "0", "{}")  # its job hash is gone
    redis_client.hincrby(LAYOUT.job_key("late"), "retries", 1)  # a late write recreated a bare hash
    named_job = Coordinator(redis_client, Layout("job"))  # a collection whose keys share the prefix
    named_job.publish("s/a")
    named_job.claim_hash("abc", 1)

    assert expire_ended_jobs(redis_client, 3600)["jobs_expired"] == 4
    for job_id in ("old-done", "old-failed"):
        assert 0 < redis_client.ttl(LAYOUT.job_key(job_id)) <= 3600
        assert (read_job(redis_client, job_id) or {}).get("ended_at")
    assert 0 < redis_client.ttl(LAYOUT.job_key("gone") + ":batches") <= 3600
    assert 0 < redis_client.ttl(LAYOUT.job_key("late")) <= 3600
    assert redis_client.ttl(LAYOUT.job_key("live")) == -1  # a live job keeps its record
    assert redis_client.ttl(LAYOUT.job_key("live") + ":batches") == -1
    assert all(redis_client.ttl(key) == -1 for key in redis_client.keys("pupyl:job:*") if "hashes" in key)
    assert redis_client.ttl(Layout("job").key(C.KEY_SEQUENCE)) == -1
    assert expire_ended_jobs(redis_client, 3600)["jobs_expired"] == 0  # once


def test_batch_ids_of_gone_jobs_are_forgotten(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, LAYOUT)
    coord.create_job("live", {"collection": "default"})
    live = coord.allocate_ids("live-000000", 2)
    coord.allocate_ids("gone-000000", 2)
    coord.allocate_ids("gone-000001", 2)
    assert forget_batch_ids(redis_client, LAYOUT)["batch_ids_forgotten"] == 2
    assert set(redis_client.hkeys(LAYOUT.key(C.KEY_BATCH_IDS))) == {"live-000000"}
    assert coord.allocate_ids("live-000000", 2) == live  # a redelivered batch of a live job: same ids


def test_job_ttl_must_outlast_a_redelivery() -> None:
    with pytest.raises(SettingsError, match="PUPYL_JOB_TTL"):
        Settings(job_ttl=60, visibility_timeout=3600)
    assert Settings(job_ttl=0).job_ttl == 0  # 0: keep for good
    env = {"PUPYL_JOB_TTL": "86400", "PUPYL_UPLOAD_GRACE": "60", "PUPYL_QUERY_TTL": "120"}
    settings = Settings.from_env(env)
    assert (settings.job_ttl, settings.upload_grace, settings.query_ttl) == (86400, 60, 120)


# --- uploads cut off mid-request


def test_a_cut_off_upload_is_failed_and_deleted_after_the_grace_time(
    pq: PupylQueue, settings: Settings
) -> None:
    seen: list[object] = []

    def dying() -> Iterator[tuple[str, bytes]]:
        for n, item in enumerate(images(5)):
            seen.append((read_job(pq.redis, newest_job(pq)["job_id"]) or {}).get("state"))
            if n == 3:
                raise Killed  # three files stored, the fourth never
            yield item

    with pytest.raises(Killed):
        pq.index_uploads(dying())
    assert seen == ["uploading"] * 4  # recorded before its first byte was stored
    job_id = str(newest_job(pq)["job_id"])
    uploads = LAYOUT.uploads(job_id)
    assert len(list(pq.store.list(uploads + "/"))) == 3
    if isinstance(pq.store, LocalStore):  # the write the kill cut short
        (pq.store.root / uploads / ".tmp-cut").write_bytes(b"")

    assert housekeep(pq.store, pq.redis, settings)["uploads_abandoned"] == 0  # within its grace: live
    assert (read_job(pq.redis, job_id) or {})["state"] == "uploading"
    assert len(list(pq.store.list(uploads + "/"))) == 3

    report = housekeep(pq.store, pq.redis, settings, now=later(settings))
    assert (report["uploads_abandoned"], report["objects_deleted"]) == (1, 3)
    job = read_job(pq.redis, job_id) or {}
    assert job["state"] == "failed" and "cut off" in job["error"]  # the user sees why
    assert 0 < pq.redis.ttl(LAYOUT.job_key(job_id)) <= settings.job_ttl
    assert job_folders(pq.store) == set()
    if isinstance(pq.store, LocalStore):
        assert not (pq.store.root / uploads).exists()  # no zero-byte temp file, no folder


def test_an_upload_that_fails_fails_its_job_at_once(pq: PupylQueue) -> None:
    def failing() -> Iterator[tuple[str, bytes]]:
        yield from images(2)
        raise OSError("the client went away")

    with pytest.raises(OSError, match="went away"):
        pq.index_uploads(failing())
    job = newest_job(pq)
    assert job["state"] == "failed" and "went away" in str(job["error"])
    assert job_folders(pq.store) == set()
    assert pq.redis.ttl(LAYOUT.job_key(str(job["job_id"]))) > 0


def test_an_upload_given_up_on_is_not_queued_after_all(pq: PupylQueue, settings: Settings) -> None:
    """Housekeeping fails a slow upload just before its uploader finishes: exactly one of them wins."""

    def slow() -> Iterator[tuple[str, bytes]]:
        yield from images(2)
        housekeep(pq.store, pq.redis, settings, now=later(settings))

    with pytest.raises(JobFailed, match="PUPYL_UPLOAD_GRACE"):
        pq.index_uploads(slow())
    assert newest_job(pq)["state"] == "failed"
    assert pq.redis.llen(C.QUEUE_INGEST) == 0  # no index task sent for it
    assert job_folders(pq.store) == set()


def test_live_jobs_keep_their_bytes(pq: PupylQueue, settings: Settings) -> None:
    coord = Coordinator(pq.redis, LAYOUT)
    for state in ("queued", "expanding", "running"):
        coord.create_job(state, {"state": state, "collection": "default", "created_at": 0})
        pq.store.put(LAYOUT.upload(state, 0, "a.png"), b"a")
        pq.store.put(LAYOUT.staged_item(state, 0), b"a")
    report = housekeep(pq.store, pq.redis, settings, now=later(settings) + 30 * 86400)
    assert report["objects_deleted"] == 0
    assert job_folders(pq.store) == {"queued", "expanding", "running"}
    assert {str(j["job_id"]): j["state"] for j in recent_jobs(pq.redis)} == {
        s: s for s in ("queued", "expanding", "running")
    }


def test_leftovers_of_gone_and_ended_jobs_go_after_the_grace_time(pq: PupylQueue, settings: Settings) -> None:
    """Files an uploader stored before jobs were recorded first (issue #19: 314 of them), and the
    staged bytes of a job that failed, are nobody's."""
    for n in range(3):
        pq.store.put(LAYOUT.upload("nobody", n, "a.png"), b"a")
    coord = Coordinator(pq.redis, LAYOUT)
    coord.create_job("failed", {"state": "failed", "collection": "default", "error": "model mismatch"})
    pq.store.put(LAYOUT.staged_item("failed", 7), b"a")

    report = housekeep(pq.store, pq.redis, settings)
    assert report["objects_deleted"] == 0 and report["jobs_expired"] == 1  # fresh: left alone for now
    assert job_folders(pq.store) == {"nobody", "failed"}

    report = housekeep(pq.store, pq.redis, settings, now=later(settings))
    assert (report["job_folders_deleted"], report["objects_deleted"]) == (2, 4)
    assert job_folders(pq.store) == set()


def test_after_redis_lost_its_state_leftovers_wait_for_rebuild(pq: PupylQueue, settings: Settings) -> None:
    """Every running job looks gone after Redis lost its data; rebuild needs their folders to say so."""
    pq.store.put(LAYOUT.segment("j-000000"), b"committed once")
    pq.store.put(LAYOUT.staged_item("running-before-the-loss", 0), b"a")
    report = housekeep(pq.store, pq.redis, settings, now=later(settings))
    assert (report["collections_skipped"], report["objects_deleted"]) == (1, 0)
    assert job_folders(pq.store) == {"running-before-the-loss"}
    Coordinator(pq.redis, LAYOUT).publish(LAYOUT.segment("j-000000"))  # what rebuild restores
    report = housekeep(pq.store, pq.redis, settings, now=later(settings))
    assert (report["collections_skipped"], report["objects_deleted"]) == (0, 1)


# --- query images whose search never ran


def test_query_images_never_searched_are_deleted(pq: PupylQueue, settings: Settings) -> None:
    query = pq._query(b"x" * 64)  # over inline_limit: put in the store, as search() does
    assert pq.store.exists(query["key"])
    assert housekeep(pq.store, pq.redis, settings)["queries_deleted"] == 0  # its search may be queued
    assert housekeep(pq.store, pq.redis, settings, now=later(settings))["queries_deleted"] == 1
    assert not pq.store.exists(query["key"])


def test_local_delete_prefix_leaves_no_folder_or_temp_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("a/b/1", b"1")
    store.put("a/b/c/2", b"2")
    store.put("a/bb/3", b"3")
    (store.root / "a" / "b" / "c" / ".tmp-killed").write_bytes(b"")
    assert store.delete_prefix("a/b/") == 2
    assert not (store.root / "a" / "b").exists()
    assert list(store.list("a/")) == ["a/bb/3"]
    store.put("a/b/again", b"x")  # the folder comes back when written to
    assert store.get("a/b/again") == b"x"


# --- the maintenance task


def test_beat_runs_housekeeping_on_the_maintenance_queue() -> None:
    from pupyl_queue.celery_app import make_app

    settings = Settings(housekeeping_interval=123)
    app = make_app(settings, include_tasks=False)
    assert app.conf.beat_schedule["housekeep"] == {"task": C.TASK_HOUSEKEEP, "schedule": 123.0}
    assert C.TASK_ROUTES[C.TASK_HOUSEKEEP] == C.QUEUE_MAINTENANCE
    app.close()


@pytest.mark.slow
def test_housekeeping_task_on_a_maintenance_worker(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A job that fails on a worker gets its TTL there; the beat task cleans up on a maintenance worker."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, inline_limit=16, upload_grace=60)
    pq = PupylQueue(settings=settings)
    query = pq._query(b"x" * 64)
    pq.store.put(LAYOUT.upload("nobody", 0, "a.png"), b"a")
    old = time.time() - 2 * 86400
    for key in (query["key"], LAYOUT.upload("nobody", 0, "a.png")):
        os.utime(pq.store.root / key, (old, old))  # written two days ago
    pq.store.put(LAYOUT.upload("fresh", 0, "a.png"), b"a")  # no record either, but just written
    workers = Workers(settings, tmp_path)
    workers.start(C.QUEUE_INGEST, C.QUEUE_MAINTENANCE)
    try:
        job = pq.index(tmp_path / "no-such-folder")
        with pytest.raises(JobFailed):
            job.wait(timeout=120)
        assert 0 < pq.redis.ttl(LAYOUT.job_key(job.id)) <= settings.job_ttl  # ended on the worker
        result = pq.app.send_task(C.TASK_HOUSEKEEP).get(timeout=120)
    finally:
        workers.stop_all()
        pq.close()
    assert (result["queries_deleted"], result["objects_deleted"]) == (1, 1), workers.logs()
    assert not pq.store.exists(query["key"])
    assert job_folders(pq.store) == {"fresh"}


UPLOADER = """
import sys, time
from pupyl_queue import PupylQueue, Settings
pq = PupylQueue(settings=Settings(data_dir=sys.argv[1], redis_url=sys.argv[2]))
def files():
    for n in range(1000):
        yield f"{n}.png", b"x" * 1000
        if n == 9:
            print("stored", flush=True)
            time.sleep(600)  # killed here
pq.index_uploads(files())
"""


def test_an_uploader_killed_mid_upload_leaves_a_job_housekeeping_ends(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Issue #19: kill -9 of the uploading process (the API) during a multi-file upload."""
    settings = Settings(data_dir=tmp_path, redis_url=redis_url)
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, str(tmp_path), redis_url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"stored\n"
    finally:
        proc.kill()  # SIGKILL: nothing of the uploader runs after this
        proc.wait()
    pq = PupylQueue(settings=settings)
    job_id = str(newest_job(pq)["job_id"])
    assert newest_job(pq)["state"] == "uploading"
    assert len(list(pq.store.list(LAYOUT.uploads(job_id) + "/"))) == 10

    housekeep(pq.store, pq.redis, settings)
    assert newest_job(pq)["state"] == "uploading"  # within the grace time: untouched
    report = housekeep(pq.store, pq.redis, settings, now=later(settings))
    assert (report["uploads_abandoned"], report["objects_deleted"]) == (1, 10)
    assert newest_job(pq)["state"] == "failed"
    assert not (pq.store.root / LAYOUT.uploads(job_id)).exists()
    pq.close()
