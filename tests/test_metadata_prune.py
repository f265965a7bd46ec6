"""Compaction prunes the metadata of removed ids (issue #15): out of the batch objects, then out of
Redis's ``removed`` set, which otherwise grew by one id per removal for good.

Real redis-server, the local store and S3 (a real moto_server), the tiny Keras model. Cut-offs
are simulated by a fence that raises at its n-th check (the prune checks before each write); a
stalled compaction by a fence holding a token the lock no longer holds.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import metadata
from pupyl_queue.backup import backup, restore
from pupyl_queue.fencing import CompactionLock, Fence, FencedOut
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import decode_batch, prune, read
from pupyl_queue.queries import compact, remove, search
from pupyl_queue.rebuild import rebuild
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.conftest import s3_store
from tests.imagegen import pattern_folder
from tests.indexing import index_folder

LAYOUT = Layout()


@pytest.fixture
def rt(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=8))


def objects(rt: Runtime) -> dict[str, dict[int, dict[str, Any]]]:
    """Batch object name -> what it holds."""
    keys = rt.store.list(f"{LAYOUT.root}/{C.STORE_META}/")
    return {k.rsplit("/", 1)[-1].removesuffix(".json"): decode_batch(rt.store.get(k)) for k in keys}


def members(rt: Runtime) -> set[str]:
    return set(rt.redis.zrange(LAYOUT.key(C.KEY_META_RANGES), 0, -1))


def removed_set(rt: Runtime) -> set[int]:
    return {int(i) for i in rt.redis.smembers(LAYOUT.key(C.KEY_REMOVED))}


def indexed(rt: Runtime, tmp_path: Path, model: Path, count: int = 20) -> tuple[list[int], list[list[int]]]:
    """``count`` images in batches of 1, 2, 4, 8, 5; their ids, and each batch's ids."""
    items = index_folder(rt, pattern_folder(tmp_path / "a", range(count)), model)
    ids = [item["id"] for item in items]
    assert all(item["status"] == "indexed" for item in items)
    by_batch = sorted(sorted(held) for held in objects(rt).values())
    assert [len(b) for b in sorted(by_batch, key=len)] == [1, 2, 4, 5, 8]
    return ids, by_batch


def remove_some(rt: Runtime, by_batch: list[list[int]]) -> set[int]:
    """All of the 2-image batch, two of the 8, one of the 5."""
    sizes = {len(b): b for b in by_batch}
    gone = {*sizes[2], *sizes[8][2:4], sizes[5][0]}
    for image_id in sorted(gone):
        assert remove(rt, {"collection": "default", "id": image_id})["removed"]
    assert removed_set(rt) == gone
    return gone


def assert_reads(rt: Runtime, ids: list[int], before: list[Any], gone: set[int]) -> None:
    """Every live id reads as before; no removed id's metadata comes back."""
    assert read(rt.store, rt.redis, LAYOUT, ids) == before
    assert [m is None for m in before] == [i in gone for i in ids]


def assert_tidy(rt: Runtime, gone: set[int]) -> None:
    """No removed id left in the set or in any object; one object per range, nothing orphaned."""
    assert removed_set(rt) == set()
    held = objects(rt)
    assert set(held) == members(rt)
    assert not gone & {i for h in held.values() for i in h}


@pytest.fixture(params=["file", "s3"])
def any_store(
    request: pytest.FixtureRequest, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> Runtime:
    base = Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=8)
    if request.param == "s3":
        base = base.replace(
            **s3_store(request.getfixturevalue("s3_endpoint"), f"s3://prune-{uuid.uuid4().hex[:8]}/pq"),
        )
    return Runtime(base)


def test_compaction_prunes_the_removed_set_and_the_batch_objects(
    any_store: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    rt = any_store
    ids, by_batch = indexed(rt, tmp_path, tiny_model)
    gone = remove_some(rt, by_batch)
    before = read(rt.store, rt.redis, LAYOUT, ids)
    old = objects(rt)
    assert redis_client.scard(LAYOUT.key(C.KEY_REMOVED)) == len(gone) == 5

    result = compact(rt, {"collection": "default"})
    assert result["metadata_pruned"] == 5 and result["count"] == 15
    assert redis_client.scard(LAYOUT.key(C.KEY_REMOVED)) == 0  # the set shrank to nothing
    assert_reads(rt, ids, before, gone)
    now = {name: held for name, held in objects(rt).items() if name in members(rt)}
    whole = next(name for name, held in old.items() if len(held) == 2)
    assert not any(metadata.batch_of(name) == whole for name in now)  # all removed: its range went
    for name, held in now.items():
        base = metadata.batch_of(name)
        want = {i: m for i, m in old[base].items() if i not in gone}
        assert held == want  # the others' entries, byte for byte the same metadata
        assert (name == base) == (want == old[base])  # rewritten under a new name only when it changed
    hits = search(rt, {"collection": "default", "query": {"id": ids[0]}, "top": 30, "metadata": True})
    assert len(hits["results"]) == 15 and all(r["metadata"]["id"] == r["id"] for r in hits["results"])

    assert len(objects(rt)) > len(members(rt))  # the swapped-out objects wait for the next prune
    skipped = compact(rt, {"collection": "default"})  # nothing new: only that
    assert "skipped" in skipped
    assert_tidy(rt, gone)
    assert_reads(rt, ids, before, gone)

    archive = tmp_path / "backup.tar"
    backup(rt.store, redis_client, "default", str(archive), rt.settings)
    assert restore(str(archive), rt.store, redis_client, rt.settings, as_name="copy")["images"] == 15
    assert read(rt.store, redis_client, Layout("copy"), ids) == before
    assert redis_client.scard(Layout("copy").key(C.KEY_REMOVED)) == 0

    redis_client.flushdb()
    assert rebuild(rt.store, redis_client, "default")["images"] == 15
    assert_reads(rt, ids, before, gone)
    assert_tidy(rt, gone)  # rebuilt: no removed id any object holds, so none in the set


def test_upserts_and_removals_by_key_keep_the_key_map_through_pruning(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    folder = pattern_folder(tmp_path / "p", range(4))
    items = [
        index_folder(rt, path, tiny_model, key=f"k{n}")[0] for n, path in enumerate(sorted(folder.iterdir()))
    ]
    replaced = index_folder(rt, pattern_folder(tmp_path / "q", [50]), tiny_model, key="k1")[0]
    assert remove(rt, {"collection": "default", "key": "k2"})["removed"]
    gone = {items[1]["id"], items[2]["id"]}
    assert removed_set(rt) == gone
    coord = rt.coordinator("default")
    want = {"k0": items[0]["id"], "k1": replaced["id"], "k3": items[3]["id"]}
    every = [i["id"] for i in items] + [replaced["id"]]
    before = read(rt.store, rt.redis, LAYOUT, every)

    compact(rt, {"collection": "default"})
    compact(rt, {"collection": "default"})
    assert_tidy(rt, gone)
    assert_reads(rt, every, before, gone)
    assert {k: coord.lookup(k)["id"] for k in want} == want and coord.lookup("k2") is None  # type: ignore[index]
    assert coord.keys_of(every) == ["k0", None, None, "k3", "k1"]
    redis_client.flushdb()
    assert rebuild(rt.store, redis_client, "default")["keys"] == 3
    assert {k: coord.lookup(k)["id"] for k in want} == want and coord.lookup("k2") is None  # type: ignore[index]
    assert_reads(rt, every, before, gone)
    assert removed_set(rt) == set()


class Killed(RuntimeError):
    pass


class KillAt(Fence):
    """A prune cut off (kill -9) just before its n-th write or Redis change."""

    def __init__(self, n: int) -> None:
        self.left = n

    def check(self) -> None:
        self.left -= 1
        if self.left == 0:
            raise Killed


# A prune of 3 objects here, in id order: the new names recorded, the 2-image batch dropped (its
# swap), the 8 and the 5 rewritten (a put and a swap each), then the SREM.
CHECKS = 7


@pytest.mark.parametrize("kill_at", range(1, CHECKS + 1))
def test_a_prune_cut_off_anywhere_shows_no_removed_id_and_a_rerun_finishes(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis, kill_at: int
) -> None:
    ids, by_batch = indexed(rt, tmp_path, tiny_model)
    gone = remove_some(rt, by_batch)
    before = read(rt.store, rt.redis, LAYOUT, ids)

    with pytest.raises(Killed):
        prune(rt.store, redis_client, LAYOUT, gone, KillAt(kill_at))
    assert_reads(rt, ids, before, gone)
    if kill_at % 2:  # and Redis lost too, rebuilt from what the cut-off run left in the store
        redis_client.flushdb()
        rebuild(rt.store, redis_client, "default")
        assert_reads(rt, ids, before, gone)
    counts = prune(rt.store, redis_client, LAYOUT, gone)
    assert counts["forgotten"] == len(gone)
    assert_reads(rt, ids, before, gone)
    prune(rt.store, redis_client, LAYOUT, gone)  # the next one deletes what the others swapped out
    assert_tidy(rt, gone)
    assert_reads(rt, ids, before, gone)


def test_a_whole_prune_makes_as_many_checks_as_the_cut_off_test_tries(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    _, by_batch = indexed(rt, tmp_path, tiny_model)
    gone = remove_some(rt, by_batch)
    fence = KillAt(CHECKS + 1)
    counts = prune(rt.store, redis_client, LAYOUT, gone, fence)
    assert fence.left == 1 and counts == {"forgotten": 5, "rewritten": 2, "dropped": 1, "deleted": 0}


def test_only_ids_a_snapshot_removed_and_batches_committed_are_pruned(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    ids, by_batch = indexed(rt, tmp_path, tiny_model)
    gone = remove_some(rt, by_batch)
    before = read(rt.store, rt.redis, LAYOUT, ids)
    eight = next(b for b in by_batch if len(b) == 8)
    name = next(n for n, held in objects(rt).items() if eight[0] in held)
    segment = LAYOUT.segment(name)
    sequence = redis_client.hget(LAYOUT.key(C.KEY_COMMIT_BY_OBJECT), segment)
    redis_client.hdel(LAYOUT.key(C.KEY_COMMIT_BY_OBJECT), segment)  # as if its batch could still run
    later = {eight[2]}  # removed after the snapshot's watermark

    prune(rt.store, redis_client, LAYOUT, gone - later)
    assert removed_set(rt) == set(eight[2:4])  # one not in the snapshot, one of an uncommitted batch
    assert name in members(rt)  # not rewritten
    assert_reads(rt, ids, before, gone)
    redis_client.hset(LAYOUT.key(C.KEY_COMMIT_BY_OBJECT), segment, sequence)
    prune(rt.store, redis_client, LAYOUT, gone)
    prune(rt.store, redis_client, LAYOUT, gone)
    assert_tidy(rt, gone)
    assert_reads(rt, ids, before, gone)


def test_a_removal_during_a_prune_stays_hidden_and_goes_next_time(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, by_batch = indexed(rt, tmp_path, tiny_model)
    gone = remove_some(rt, by_batch)
    eight = next(b for b in by_batch if len(b) == 8)
    late = eight[5]
    put = type(rt.store).put

    def put_then_remove(store: Any, key: str, data: bytes) -> None:
        if metadata.VERSION_MARK in key and late not in removed_set(rt):
            assert remove(rt, {"collection": "default", "id": late})["removed"]  # between read and write
        put(store, key, data)

    monkeypatch.setattr(type(rt.store), "put", put_then_remove)
    prune(rt.store, redis_client, LAYOUT, gone)
    monkeypatch.undo()
    assert removed_set(rt) == {late}
    assert read(rt.store, rt.redis, LAYOUT, [late]) == [None]
    rewritten = next(h for n, h in objects(rt).items() if n in members(rt) and eight[0] in h)
    assert late in rewritten  # the object read before the removal still holds it: the set hides it
    prune(rt.store, redis_client, LAYOUT, gone | {late})
    prune(rt.store, redis_client, LAYOUT, gone | {late})
    assert_tidy(rt, gone | {late})
    assert sum(m is not None for m in read(rt.store, rt.redis, LAYOUT, ids)) == 20 - 6


def test_a_prune_that_lost_the_compaction_lock_changes_nothing_and_leaves_no_orphan(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    """A compaction stalled past its lock's lifetime: its store writes may still land, but its
    swaps and its SREM are refused in Redis (the token), so no removed id comes back."""
    ids, by_batch = indexed(rt, tmp_path, tiny_model)
    eight = next(b for b in by_batch if len(b) == 8)
    gone = set(eight[2:5])  # its first step a rewrite: a write, then a swap
    for image_id in gone:
        assert remove(rt, {"collection": "default", "id": image_id})["removed"]
    before = read(rt.store, rt.redis, LAYOUT, ids)
    lock = CompactionLock(redis_client, rt.store, LAYOUT, ttl_s=60)
    assert lock.acquire()
    stalled = Fence()  # checks nothing any more (its checks passed before the stall), holds A's token
    stalled.token, stalled.key = lock.token, lock.key
    redis_client.delete(lock.key)  # the lock lapsed...
    taker = CompactionLock(redis_client, rt.store, LAYOUT, ttl_s=60)
    assert taker.acquire() and taker.token > lock.token  # ...and another run took it

    ranges = redis_client.zrange(LAYOUT.key(C.KEY_META_RANGES), 0, -1, withscores=True)
    with pytest.raises(FencedOut):
        prune(rt.store, redis_client, LAYOUT, gone, stalled)
    assert redis_client.zrange(LAYOUT.key(C.KEY_META_RANGES), 0, -1, withscores=True) == ranges
    assert removed_set(rt) == gone
    assert any(metadata.VERSION_MARK in name for name in objects(rt))  # its late write landed
    assert_reads(rt, ids, before, gone)
    with pytest.raises(FencedOut):
        prune(rt.store, redis_client, LAYOUT, gone, lock)  # its own check refuses too

    assert prune(rt.store, redis_client, LAYOUT, gone, taker)["forgotten"] == 3
    taker.release()
    last = CompactionLock(redis_client, rt.store, LAYOUT, ttl_s=60)
    assert last.acquire()
    prune(rt.store, redis_client, LAYOUT, gone, last)
    assert_tidy(rt, gone)  # the stalled run's object deleted with the swapped-out ones
    assert_reads(rt, ids, before, gone)
