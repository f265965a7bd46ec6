"""Coordination scripts against a real redis-server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue.coordination import BatchCounted, Coordinator, read_job
from pupyl_queue.layout import Layout


def test_batch_ids_are_allocated_once(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    first = coord.allocate_ids("job-000001", 3)
    assert first == [1, 2, 3]
    assert coord.allocate_ids("job-000001", 3) == first  # a redelivered batch
    assert coord.allocate_ids("job-000002", 2) == [4, 5]


def test_concurrent_allocations_never_overlap(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda n: coord.allocate_ids(f"b{n}", 5), range(40)))
    ids = [i for batch in batches for i in batch]
    assert len(ids) == len(set(ids)) == 200


def test_publish_is_idempotent_and_ordered(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    assert coord.publish("s/a") == 1
    assert coord.publish("s/b") == 2
    assert coord.publish("s/a") == 1
    assert coord.changes() == 2
    assert coord.commits_after(0) == [(1, "s/a"), (2, "s/b")]
    assert coord.commits_after(1) == [(2, "s/b")]


def test_hash_claim_has_one_winner(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    with ThreadPoolExecutor(8) as pool:
        owners = set(pool.map(lambda i: coord.claim_hash("abc", i), range(1, 50)))
    assert len(owners) == 1
    owner = owners.pop()
    coord.release_hash("abc", owner + 1000)  # not the owner: no effect
    assert coord.claim_hash("abc", 999) == owner
    coord.release_hash("abc", owner)
    assert coord.claim_hash("abc", 999) == 999


def test_claims_in_one_round_trip_keep_order(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    coord.claim_hash("old", 7)
    assert coord.claim_hashes([("a", 1), ("old", 2), ("a", 3), ("b", 4)]) == [1, 7, 1, 4]
    assert coord.claim_hashes([]) == []


def test_batch_counts_once(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, Layout())
    coord.create_job("j1", {"collection": "default"})
    summary = {"batch": 0, "sequence": 1, "indexed": 3, "duplicate": 1, "failed": 2}
    assert coord.finish_batch("j1", 0, summary) is True
    assert coord.finish_batch("j1", 0, summary) is False
    job = read_job(redis_client, "j1")
    assert job is not None
    assert (job["indexed"], job["duplicate"], job["failed"], job["batches_done"]) == (3, 1, 2, 1)
    assert coord.finished_batch("j1", 0) == summary


def test_a_batch_counted_without_its_commit_can_no_longer_commit_and_the_reverse(
    redis_client: redis.Redis,
) -> None:
    """A failure count and a live delivery's commit race: whichever comes first, only it happens."""
    coord = Coordinator(redis_client, Layout())
    coord.create_job("j1", {"collection": "default"})
    failed = {"batch": 0, "sequence": None, "indexed": 0, "duplicate": 0, "failed": 2, "error": "gave up"}
    segment = coord.layout.segment("j1-000000")
    assert coord.finish_batch("j1", 0, failed, unless_committed=segment) is True
    with pytest.raises(BatchCounted):
        coord.commit(segment, images=2, batch=("j1", 0))
    assert (coord.last_sequence(), coord.image_count(), coord.commits_after(0)) == (0, 0, [])
    assert coord.commit(coord.layout.segment("j1-000001"), images=1, batch=("j1", 1))[0] == 1  # others commit

    assert (
        coord.finish_batch(
            "j1", 1, {**failed, "batch": 1}, unless_committed=coord.layout.segment("j1-000001")
        )
        is False
    )
    assert coord.finished_batch("j1", 1) is None  # committed first: the failure was not counted
    assert (read_job(redis_client, "j1") or {})["batches_failed"] == 1


def test_collections_do_not_share_keys(redis_client: redis.Redis) -> None:
    a, b = Coordinator(redis_client, Layout("a")), Coordinator(redis_client, Layout("b"))
    a.publish("x")
    assert b.commits_after(0) == [] and b.last_sequence() == 0


def test_a_batch_published_again_after_its_commit_was_trimmed_is_not_counted_twice(
    redis_client: redis.Redis,
) -> None:
    """Compaction trims the commit log; a late redelivery of a trimmed batch must keep its first commit."""
    from pupyl_queue import integrity

    coord = Coordinator(redis_client, Layout())
    assert coord.publish("s/a", images=3) == 1
    assert coord.publish("s/b", images=2) == 2
    coord.trim_commits(2)  # two compactions later: both inside the snapshot
    assert coord.commits_after(0) == []
    assert integrity.is_committed(coord, "s/a")
    assert coord.publish("s/a", images=3) == 1  # the same sequence, not a new one
    assert coord.image_count() == 5
    assert coord.last_sequence() == 2
    assert coord.commits_after(0) == []  # not back in the log for searchers to apply again


def test_the_commit_records_its_checksum_once(redis_client: redis.Redis) -> None:
    """The segment's sha256 goes in with its commit (one Lua call, issue #15): never before it,
    never replaced by a later publish of the same object, never for a commit refused."""
    coord = Coordinator(redis_client, Layout())
    checksums = Layout().key(C.KEY_CHECKSUMS)
    sequence, _ = coord.commit("s/a", images=1, keyed=[("k", 1, "aa")], checksum="11" * 32)
    assert sequence == 1 and redis_client.hget(checksums, "s/a") == "11" * 32
    assert coord.commit("s/a", images=1, checksum="22" * 32)[0] == 1  # a rerun: the first one's stays
    assert redis_client.hget(checksums, "s/a") == "11" * 32
    assert coord.commit("s/b", keyed=[("k", 2, "bb")], expect=7, checksum="33" * 32) == (0, [])
    assert redis_client.hget(checksums, "s/b") is None and coord.last_sequence() == 1  # refused: nothing
    assert coord.commit("s/c", keyed=[("k", 3, "cc")], expect=1, checksum="44" * 32) == (2, [(1, "k")])
    assert redis_client.hget(checksums, "s/c") == "44" * 32 and coord.lookup("k")["id"] == 3  # type: ignore[index]
    assert coord.publish("t/9", removes=3, checksum="55" * 32) == 3
    assert redis_client.hget(checksums, "t/9") == "55" * 32 and coord.lookup("k") is None
    coord.publish("s/d")  # no checksum given (restore records its own first): none written
    assert redis_client.hget(checksums, "s/d") is None
