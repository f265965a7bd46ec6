"""Redis wiped: `rebuild` derives ids, commit log, dedup map, counts and jobs from the store again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import read as read_metadata
from pupyl_queue.queries import compact, remove, search
from pupyl_queue.rebuild import RebuildError, rebuild
from pupyl_queue.runtime import Runtime
from tests.conftest import ROOT
from tests.imagegen import pattern_folder
from tests.indexing import index_folder
from tests.workers import Workers


def image_folder(root: Path, name: str, seeds: range) -> Path:
    return pattern_folder(root / name, seeds)


def redis_state(client: redis.Redis, layout: Layout) -> dict:
    return {
        "ids": int(client.get(layout.key(C.KEY_ID_COUNTER)) or 0),
        "count": int(client.get(layout.key(C.KEY_COUNT)) or 0),
        "snapshot": int(client.get(layout.key(C.KEY_SNAPSHOT)) or 0),
        "seq": int(client.get(layout.key(C.KEY_SEQUENCE)) or 0),
        "commits": client.zrange(layout.key(C.KEY_COMMITS), 0, -1),
        "hashes": client.hgetall(layout.key(C.KEY_HASHES)),
    }


def ranked(rt: Runtime, queries: list[int]) -> list[list[tuple[int, float]]]:
    answers = [search(rt, {"collection": "default", "query": {"id": q}, "top": 50}) for q in queries]
    return [[(r["id"], round(r["distance"], 5)) for r in a["results"]] for a in answers]


def test_rebuild_restores_what_redis_lost(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, tiny_model: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url)
    layout = Layout()
    rt = Runtime(settings)
    first = index_folder(rt, image_folder(tmp_path, "a", range(10)), tiny_model)
    compact(rt, {"collection": "default"})  # a snapshot holds the first ten
    second = index_folder(rt, image_folder(tmp_path, "b", range(10, 16)), tiny_model)
    removed = [first[2]["id"], second[0]["id"]]  # one inside the snapshot, one after it
    for image_id in removed:
        assert remove(rt, {"collection": "default", "id": image_id})["removed"]
    # a job interrupted by the loss: its staged bytes are still in the store
    rt.store.put(layout.staged_item("deadbeef", 0), b"staged bytes of a lost batch")
    queries = [first[0]["id"], second[3]["id"]]
    before_results = ranked(rt, queries)
    before = redis_state(redis_client, layout)
    every_id = [item["id"] for item in first + second]
    metas_before = read_metadata(rt.store, redis_client, layout, every_id)
    job_keys = [k for k in redis_client.scan_iter("pupyl:job:*") if not k.endswith(":batches")]
    jobs_before = {k: redis_client.hgetall(k) for k in job_keys}

    redis_client.flushdb()
    with pytest.raises(RebuildError, match="no collection"):
        rebuild(rt.store, redis_client, "nothing-here")
    report = rebuild(rt.store, redis_client, "default")
    with pytest.raises(RebuildError, match="still holds"):
        rebuild(rt.store, redis_client, "default")  # over live state: refused

    after = redis_state(redis_client, layout)
    assert after["ids"] >= before["ids"] and after["count"] == before["count"] == 14
    assert after["hashes"] == before["hashes"]
    assert after["snapshot"] == before["snapshot"] > 0
    assert sorted(after["commits"]) == sorted(before["commits"])  # the same commits after the snapshot
    assert after["seq"] == before["seq"] == len(after["commits"])  # the whole log, contiguous from 1
    assert report["jobs"] == 3 and report["jobs_interrupted"] == 1
    assert not list(rt.store.list(layout.staging("deadbeef") + "/"))
    for key, fields in jobs_before.items():
        rebuilt = redis_client.hgetall(key)
        assert rebuilt["state"] == "done"
        for field in ("indexed", "duplicate", "failed", "batches_done"):
            assert rebuilt[field] == fields[field], (field, rebuilt, fields)
    assert redis_client.hget("pupyl:job:deadbeef", "error").startswith("interrupted")
    # metadata by id, from the batch objects: the ranges and the removed ids came back
    assert read_metadata(rt.store, redis_client, layout, every_id) == metas_before
    assert [metas_before[every_id.index(i)] for i in removed] == [None, None]
    assert sum(m is not None for m in metas_before) == 14

    fresh = Runtime(settings)  # a search worker started after the loss
    assert ranked(fresh, queries) == before_results
    assert ranked(rt, queries) == before_results  # one that lived through it reloads (new epoch)
    third = index_folder(fresh, image_folder(tmp_path, "c", range(16, 19)), tiny_model)
    assert min(item["id"] for item in third) > max(int(i) for i in before["hashes"].values())
    again = index_folder(fresh, tmp_path / "a", tiny_model, check_unique=True)
    statuses = [item["status"] for item in again]
    assert statuses.count("duplicate") == 9 and statuses.count("indexed") == 1  # only the removed one


def test_rebuild_after_garbage_collection_starts_at_the_oldest_whole_snapshot(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, tiny_model: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, snapshot_keep=2))
    layout = Layout()
    watermarks = []
    for n, name in enumerate("abc"):
        items = index_folder(rt, image_folder(tmp_path, name, range(30 + 5 * n, 35 + 5 * n)), tiny_model)
        watermarks.append(compact(rt, {"collection": "default"})["watermark"])
    remove(rt, {"collection": "default", "id": items[1]["id"]})
    index_folder(rt, image_folder(tmp_path, "d", range(50, 53)), tiny_model)
    before = redis_state(redis_client, layout)
    assert (
        before["commits"]
        and min(redis_client.zrange(layout.key(C.KEY_COMMITS), 0, 0, withscores=True))[1] > watermarks[0]
    )  # the log was trimmed: the oldest commits are gone with their segments
    queries = [items[0]["id"], items[2]["id"]]
    before_results = ranked(rt, queries)

    redis_client.flushdb()
    report = rebuild(rt.store, redis_client, "default")
    after = redis_state(redis_client, layout)
    assert report["log_from"] == watermarks[1]  # the older kept snapshot: its fallback still works
    assert sorted(after["commits"]) == sorted(before["commits"]) and after["seq"] == before["seq"]
    assert (after["count"], after["hashes"]) == (before["count"], before["hashes"])
    assert ranked(Runtime(rt.settings), queries) == before_results


def test_rebuild_reads_both_metadata_layouts(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, tiny_model: Path
) -> None:
    """A collection first written one metadata object per image, then one per batch."""
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))
    layout = Layout()
    redis_client.set(layout.key(C.KEY_ID_COUNTER), 5)  # ids 1-5 went to an embed worker before batch objects
    old = {"id": 4, "ref": "old/4.jpg", "sha256": "ab" * 32}
    rt.store.put(layout.image_meta(4), json.dumps(old).encode())
    redis_client.hset(layout.key(C.KEY_HASHES), old["sha256"], 4)
    items = index_folder(rt, image_folder(tmp_path, "a", range(4)), tiny_model)
    remove(rt, {"collection": "default", "id": items[2]["id"]})
    ids = [4, *(item["id"] for item in items)]
    before = read_metadata(rt.store, redis_client, layout, ids)
    hashes = redis_client.hgetall(layout.key(C.KEY_HASHES))
    assert before[0] == old and before[3] is None and len(hashes) == 4

    redis_client.flushdb()
    assert read_metadata(rt.store, redis_client, layout, ids)[1] is None  # no range index: unreadable
    report = rebuild(rt.store, redis_client, "default")
    assert report["images"] == 4
    assert read_metadata(rt.store, redis_client, layout, ids) == before
    assert redis_client.hgetall(layout.key(C.KEY_HASHES)) == hashes


@pytest.mark.slow
def test_redis_flushed_under_live_workers(redis_url: str, tmp_path: Path, tiny_model: Path) -> None:
    """FLUSHALL while the workers run; `pupyl-queue rebuild`; they answer as before; indexing goes on."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/13")
    workers = Workers(settings, tmp_path)
    workers.start()
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    try:
        job = client.index(image_folder(tmp_path, "a", range(100, 112)), check_unique=True)
        assert job.wait(timeout=180)["indexed"] == 12
        client.compact()
        later = client.index(image_folder(tmp_path, "b", range(112, 118)), check_unique=True)
        assert later.wait(timeout=180)["indexed"] == 6
        gone = client.search(tmp_path / "b" / "113.jpg", top=1)[0]
        client.remove(gone)
        queries = [tmp_path / "a" / "101.jpg", tmp_path / "b" / "115.jpg"]
        before = [client.search(q, top=20, return_distances=True) for q in queries]
        max_id = max(i for rows in before for i, _ in rows)

        client.redis.flushdb()  # Redis lost everything: broker queues, results, coordination
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUPYL_")}
        env.update(settings.to_env())
        done = subprocess.run(
            [sys.executable, "-m", "pupyl_queue.cli", "rebuild"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["images"] == 17

        deadline = time.monotonic() + 60
        while [client.search(q, top=20, return_distances=True) for q in queries] != before:
            assert time.monotonic() < deadline, "the search worker does not answer as before"
            time.sleep(0.5)
        assert client.job(job.id).progress()["state"] == "done"
        assert client.job(job.id).progress()["indexed"] == 12
        more = client.index(image_folder(tmp_path, "c", range(118, 121)), check_unique=True)
        assert more.wait(timeout=180)["indexed"] == 3
        again = client.index(tmp_path / "a", check_unique=True).wait(timeout=180)
        assert (again["indexed"], again["duplicate"]) == (0, 12)  # the dedup map came back
        new_ids = [r["id"] for r in more.report() if r.get("status") == "indexed"]
        assert len(new_ids) == 3 and min(new_ids) > max_id  # no id reused
        assert gone not in client.search(tmp_path / "b" / "113.jpg", top=30)
        workers.check_alive()
    finally:
        client.close()
        workers.stop_all()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
