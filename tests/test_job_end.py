"""Every job ends, every claim is released (issue #16): in-process, against real Redis and a real store.

A batch that failed for good, a claim left by such a batch, and a job whose tasks vanished from
the broker. tests/test_job_end_workers.py does the same through real Celery workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pupyl_queue import PupylQueue
from pupyl_queue import constants as C
from pupyl_queue.client import JobFailed
from pupyl_queue.coordination import Coordinator, read_job
from pupyl_queue.embedding import _BatchRun, embed_batch
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.imagegen import encode, pattern
from tests.indexing import expand_folder


@pytest.fixture
def rt(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path, redis_url=redis_url, batch_size=4))


@pytest.fixture
def client(rt: Runtime) -> Iterator[PupylQueue]:
    pq = PupylQueue(settings=rt.settings.replace(job_stall_s=0))
    yield pq
    pq.close()


def folder_of(tmp_path: Path, count: int, name: str = "imgs") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for seed in range(count):
        (folder / f"{seed:02d}.png").write_bytes(encode(pattern(seed), "PNG"))
    return folder


def claim_without_commit(rt: Runtime, batch: dict) -> list[int]:
    """What a batch does before it fails for good: ids allocated, hashes claimed, nothing committed."""
    coord = rt.coordinator(batch["collection"])
    ids = coord.allocate_ids(f"{batch['job_id']}-{batch['batch']:06d}", len(batch["items"]))
    _BatchRun(rt, batch, ids).embed()
    return ids


def indexed_and_duplicates(rt: Runtime, batches: list[dict]) -> tuple[int, list[int]]:
    items = [item for batch in batches for item in embed_batch(rt, batch)["items"]]
    return (
        sum(1 for i in items if i["status"] == "indexed"),
        [i["duplicate_of"] for i in items if i["status"] == "duplicate"],
    )


# --- item 2: claims of a batch that never committed
def test_claims_of_a_failed_job_do_not_make_later_copies_duplicates(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """A job failed after its claims (the old code failed the whole job on a bug in one batch)."""
    folder = folder_of(tmp_path, 4)
    first = expand_folder(rt, folder, tiny_model, job_id="dead")
    ghosts = claim_without_commit(rt, first[-1])  # 2 images claimed, never committed
    rt.coordinator("default").update_job("dead", state="failed", error="RuntimeError: a bug")
    later = expand_folder(rt, folder, tiny_model, job_id="later", check_unique=True)
    indexed, duplicates = indexed_and_duplicates(rt, later)
    assert not set(duplicates) & set(ghosts), f"duplicates of ids never committed: {duplicates}"
    assert (indexed, duplicates) == (4, [])
    assert (read_job(rt.redis, "later") or {})["state"] == "done"


def test_a_claim_of_a_batch_still_running_keeps_its_copies_out(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """Dedup across jobs at the same moment still works: a live owner is an owner."""
    folder = folder_of(tmp_path, 4)
    first = expand_folder(rt, folder, tiny_model, job_id="busy")
    owners = claim_without_commit(rt, first[-1])  # in flight: its job runs, the batch is not finished
    later = expand_folder(rt, folder, tiny_model, job_id="later", check_unique=True)
    indexed, duplicates = indexed_and_duplicates(rt, later)
    assert (indexed, sorted(duplicates)) == (2, owners)


def test_a_batch_failed_for_good_releases_its_claims_and_ends_its_job_partial(
    rt: Runtime, client: PupylQueue, tmp_path: Path, tiny_model: Path
) -> None:
    from pupyl_queue import jobs

    rt = Runtime(rt.settings.replace(inline_item_bytes=0))  # staged in the store: the failure deletes them
    folder = folder_of(tmp_path, 6)
    batches = expand_folder(rt, folder, tiny_model, job_id="j1", check_unique=True)
    assert [len(b["items"]) for b in batches] == [1, 1, 2, 2]
    for batch in batches[:3]:
        embed_batch(rt, batch)
    claim_without_commit(rt, batches[3])
    reason = "gave up after 12 retries: StoreUnavailable: S3 store unreachable"
    assert jobs.fail_batch(rt.redis, rt.store, batches[3], reason, ttl=60)
    assert not jobs.fail_batch(rt.redis, rt.store, batches[3], reason, ttl=60)  # counted once
    state = client.job("j1").wait(timeout=10)
    assert (state["state"], state["indexed"], state["failed"], state["batches_failed"]) == (
        "partial",
        4,
        2,
        1,
    )
    assert reason in state["error"]
    failures = client.job("j1").failures()
    assert [(f["ref"], f["error"]) for f in failures] == [(i["ref"], reason) for i in batches[3]["items"]]
    assert list(rt.store.list(Layout().staging("j1") + "/")) == []
    assert rt.redis.hlen(Layout().key(C.KEY_PENDING_CLAIMS)) == 0
    # The failed batch delivered once more (e.g. its message restored) changes nothing.
    assert embed_batch(rt, batches[3])["failed"] == 2
    # Its images were never indexed: a later check_unique job indexes them, not "duplicate of" a ghost.
    again = expand_folder(rt, folder, tiny_model, job_id="j2", check_unique=True)
    indexed, duplicates = indexed_and_duplicates(rt, again)
    assert (indexed, len(duplicates)) == (2, 4)


def test_every_batch_failed_fails_the_job(
    rt: Runtime, client: PupylQueue, tmp_path: Path, tiny_model: Path
) -> None:
    from pupyl_queue import jobs

    batches = expand_folder(rt, folder_of(tmp_path, 2), tiny_model, job_id="j1")
    for batch in batches:
        jobs.fail_batch(rt.redis, rt.store, batch, "ModelError: no such model", ttl=60)
    with pytest.raises(JobFailed, match="2 of 2 batches failed: ModelError"):
        client.job("j1").wait(timeout=10)


# --- item 1: a job whose tasks are gone
def lost_job(coord: Coordinator, job_id: str) -> None:
    """An expanded job of 3 batches (1, 1 and 2 images) whose batch 0 finished."""
    coord.create_job(job_id, {"collection": "default", "state": "running"})
    coord.update_job(job_id, expanded=1, total=4, batches_total=3, batch_size=4, updated_at=0)
    coord.finish_batch(job_id, 0, {"batch": 0, "sequence": 1, "indexed": 1, "duplicate": 0, "failed": 0})
    coord.r.hset(coord.layout.job_key(job_id), "updated_at", 0)


def test_a_job_whose_tasks_are_gone_is_ended_and_a_wait_returns(rt: Runtime, client: PupylQueue) -> None:
    from pupyl_queue import jobs
    from pupyl_queue.celery_app import make_app

    coord = rt.coordinator("default")
    lost_job(coord, "j1")
    app = make_app(rt.settings, include_tasks=False)
    try:  # batch 1 queued (no worker runs it yet), batch 2 held by a worker for a retry
        app.send_task(C.TASK_EMBED, kwargs={"job_id": "j1", "batch": 1}, task_id=jobs.batch_id("j1", 1))
        rt.redis.hset(
            jobs.UNACKED, "tag", '[{{"headers": {{"id": "{}"}}}}, "", "embed"]'.format(jobs.batch_id("j1", 2))
        )
        assert jobs.end_if_lost(rt.redis, rt.store, "j1", stall_s=0, ttl=60, recheck_s=0) is None
        rt.redis.delete(C.QUEUE_EMBED)  # both gone: purged by hand, the worker and its Redis lost
        assert jobs.end_if_lost(rt.redis, rt.store, "j1", stall_s=0, ttl=60, recheck_s=0) is None
        rt.redis.delete(jobs.UNACKED)
        assert (
            jobs.end_if_lost(rt.redis, rt.store, "j1", stall_s=3600, ttl=60, recheck_s=0) is None
        )  # not stalled
    finally:
        app.close()
    state = client.job("j1").wait(timeout=30)
    assert (state["state"], state["indexed"], state["failed"], state["batches_done"]) == ("partial", 1, 3, 3)
    failures = client.job("j1").failures()
    assert [f["ref"] for f in failures] == ["item 1 of job j1", "item 2 of job j1", "item 3 of job j1"]
    assert all("its task was lost" in f["error"] for f in failures)


def test_the_beat_sweep_fails_a_job_whose_expansion_vanished(rt: Runtime) -> None:
    from pupyl_queue import jobs

    coord = rt.coordinator("default")
    coord.create_job("j1", {"collection": "default", "state": "queued", "created_at": 0})
    coord.create_job("j2", {"collection": "default", "state": "done", "created_at": 0})
    assert jobs.end_lost_jobs(rt.redis, rt.store, stall_s=0, ttl=60) == {"j1": "failed"}
    state = read_job(rt.redis, "j1") or {}
    assert state["state"] == "failed" and "its task was lost" in state["error"]


def test_index_wait_on_the_command_line_returns_when_the_job_is_lost(
    rt: Runtime, redis_url: str, tmp_path: Path
) -> None:
    """``pupyl-queue index --wait`` with no worker and its task purged: it ends, it does not hang."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("PUPYL_")}
    env.update(PUPYL_DATA_DIR=str(tmp_path / "data"), PUPYL_REDIS_URL=redis_url, PUPYL_JOB_STALL_S="1")
    folder = folder_of(tmp_path, 1)
    cli = subprocess.Popen(
        [sys.executable, "-m", "pupyl_queue.cli", "index", str(folder), "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not rt.redis.llen(C.QUEUE_INGEST):  # its index task, queued (no worker runs here)
            assert cli.poll() is None, cli.communicate()
            time.sleep(0.05)
        rt.redis.delete(C.QUEUE_INGEST)  # purged
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 1, (out, err)
    assert "failed" in out and "its task was lost" in out


def test_a_late_second_delivery_of_a_batch_leaves_the_first_ones_report_and_claims(
    rt: Runtime, client: PupylQueue, tmp_path: Path, tiny_model: Path
) -> None:
    """Delivery X of a batch runs long (past the visibility timeout); delivery Y of it finishes first.

    X's view is stale (here: every image a near duplicate of id 999; in tests/test_faults.py: the
    staged copies Y deleted, "missing"). It must not overwrite Y's report nor release Y's claims.
    """
    rt = Runtime(rt.settings.replace(inline_item_bytes=0))
    folder = folder_of(tmp_path, 2)
    batches = expand_folder(rt, folder, tiny_model, job_id="j1", near_duplicate=0.5)
    batch = batches[-1]
    first: list[dict] = []
    asked: list[int] = []

    def nearest(collection: str, vectors) -> list:  # noqa: ANN001
        asked.append(len(vectors))
        if len(asked) > 1:  # Y's own question: nothing indexed yet
            return [None] * len(vectors)
        first.append(embed_batch(rt, batch, nearest))  # Y runs and finishes while X waits here
        return [(999, 0.0)] * len(vectors)

    late = embed_batch(rt, batch, nearest)  # X
    assert first[0]["indexed"] == 1
    assert late["indexed"] == 1 and late["duplicate"] == 0
    assert [i["status"] for i in client.job("j1").report() if i["ref"].endswith("01.png")] == ["indexed"]
    image_id = first[0]["items"][0]["id"]
    assert str(image_id) in rt.redis.hvals(Layout().key(C.KEY_HASHES))  # Y's claim still stands


# --- a batch counted failed for good leaves nothing behind, and no later delivery commits it
def batch_objects(rt: Runtime, batch: dict, ids: list[int]) -> list[str]:
    """The objects under the batch's ids (copies) and its own (metadata, segment) now in the store."""
    wanted = set(Layout().batch_objects(f"{batch['job_id']}-{batch['batch']:06d}", ids))
    return sorted(key for key in rt.store.list(Layout().root + "/") if key in wanted)


def test_a_batch_failed_for_good_deletes_the_copies_its_runs_wrote(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    from pupyl_queue import jobs

    batches = expand_folder(rt, folder_of(tmp_path, 6), tiny_model, job_id="j1")
    assert [len(b["items"]) for b in batches] == [1, 1, 2, 2]
    kept = [item["id"] for item in embed_batch(rt, batches[3])["items"]]
    ids = claim_without_commit(rt, batches[1])  # its run wrote its copies, then died before the commit
    assert batch_objects(rt, batches[1], ids) == sorted(Layout().image(i) for i in ids)
    assert jobs.fail_batch(rt.redis, rt.store, batches[1], "gave up", ttl=60)
    assert batch_objects(rt, batches[1], ids) == []
    # A committed batch's objects stay: its copies, metadata object and segment.
    assert len(batch_objects(rt, batches[3], kept)) == len(kept) + 2
    assert jobs.fail_batch(rt.redis, rt.store, batches[2], "gave up", ttl=60)  # no ids yet: nothing to delete


def test_copies_a_failed_batch_could_not_delete_go_with_housekeeping(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """The store down as the batch is counted failed: its copies are named in Redis, and deleted by
    housekeeping's next round with the store back (before, they stayed in the store for good)."""
    from pupyl_queue import jobs
    from pupyl_queue.housekeeping import delete_orphans, housekeep
    from pupyl_queue.store import LocalStore, StoreUnavailable

    class Down(LocalStore):
        def delete_many(self, keys: object) -> None:
            raise StoreUnavailable("the store is down")

    batches = expand_folder(rt, folder_of(tmp_path, 6), tiny_model, job_id="j1")
    ids = claim_without_commit(rt, batches[1])
    copies = batch_objects(rt, batches[1], ids)
    assert copies == sorted(Layout().image(i) for i in ids)
    assert jobs.fail_batch(rt.redis, Down(rt.store.root), batches[1], "gave up", ttl=60)
    assert batch_objects(rt, batches[1], ids) == copies  # still there: the store was down
    orphans = rt.redis.smembers(Layout().key(C.KEY_ORPHANS))
    assert set(copies) <= orphans
    with pytest.raises(StoreUnavailable):  # a round with the store still down keeps the names
        delete_orphans(Down(rt.store.root), rt.redis, Layout())
    assert rt.redis.smembers(Layout().key(C.KEY_ORPHANS)) == orphans
    report = housekeep(rt.store, rt.redis, rt.settings)
    assert report["orphans_deleted"] == len(orphans)
    assert batch_objects(rt, batches[1], ids) == []
    assert not rt.redis.exists(Layout().key(C.KEY_ORPHANS))


def test_a_delivery_still_running_when_its_batch_failed_for_good_commits_nothing(
    rt: Runtime, client: PupylQueue, tmp_path: Path, tiny_model: Path
) -> None:
    """Two live deliveries of one batch: one is given up on (counted failed) while the other runs.

    The other must not make the images searchable afterwards: the job's report calls them failed
    and their claims were released. Its commit is refused; what it wrote and claimed goes.
    """
    from pupyl_queue import jobs
    from pupyl_queue.store import LocalStore

    batches = expand_folder(rt, folder_of(tmp_path, 2), tiny_model, job_id="j1")
    batch = batches[-1]
    meta_key = Layout().batch_meta(jobs.batch_id("j1", batch["batch"]))

    class CountedMidway(LocalStore):
        """The store of the live delivery: its batch is given up on just as it writes its metadata."""

        def put(self, key: str, data: bytes) -> None:
            if key == meta_key:
                assert jobs.fail_batch(rt.redis, LocalStore(self.root), batch, "gave up", ttl=60)
            super().put(key, data)

    rt.__dict__["store"] = CountedMidway(rt.store.root)
    out = embed_batch(rt, batch)
    assert (out["failed"], out["sequence"], out["error"]) == (1, None, "gave up")
    coord = rt.coordinator("default")
    assert (coord.image_count(), coord.last_sequence()) == (0, 0)
    ids = coord.batch_ids(jobs.batch_id("j1", batch["batch"]), 1)
    assert batch_objects(rt, batch, ids) == []
    assert rt.redis.hlen(Layout().key(C.KEY_PENDING_CLAIMS)) == 0
    assert ids[0] not in [int(v) for v in rt.redis.hvals(Layout().key(C.KEY_HASHES))]
    assert [
        (f["status"], f["error"]) for f in client.job("j1").report() if f["ref"] == batch["items"][0]["ref"]
    ] == [("failed", "gave up")]
