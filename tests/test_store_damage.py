"""Store damage (issue #10): a truncated or altered snapshot or segment is detected, reported, routed around.

Real Redis, a real local store, and the S3 protocol through moto_server; no workers.
Every test first checks that the damage is really there (the bytes differ), then that
the searcher's answers are exactly those of an undamaged one, or marked degraded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import integrity
from pupyl_queue.codecs import encode_segment, encode_vectors
from pupyl_queue.compaction import Compactor
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import StoreDamaged
from pupyl_queue.layout import Layout
from pupyl_queue.models import normalize
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings
from pupyl_queue.store import LocalStore, ObjectStore, open_store
from tests.conftest import s3_store

DIM = 8
QUERIES = normalize(np.random.default_rng(99).normal(size=(6, DIM)))


@pytest.fixture
def parts(redis_client: redis.Redis, tmp_path: Path) -> tuple[ObjectStore, Coordinator, Layout]:
    layout = Layout()
    return LocalStore(tmp_path), Coordinator(redis_client, layout), layout


def commit_segment(parts: tuple, name: str, ids: list[int], seed: int) -> None:
    """Committed as the embed stage does: the bytes, their checksum, then the commit."""
    store, coord, layout = parts
    vectors = normalize(np.random.default_rng(seed).normal(size=(len(ids), DIM)))
    data = encode_segment(np.array(ids), vectors)
    store.put(layout.segment(name), data)
    integrity.record_checksum(coord, layout.segment(name), data)
    coord.publish(layout.segment(name))


def commit_tombstone(parts: tuple, image_id: int) -> None:
    store, coord, layout = parts
    data = json.dumps({"id": image_id}).encode()
    store.put(layout.tombstone(image_id), data)
    integrity.record_checksum(coord, layout.tombstone(image_id), data)
    coord.publish(layout.tombstone(image_id))


def compact(parts: tuple, keep: int = 2) -> dict:
    store, coord, _ = parts
    return Compactor(store, coord, Settings(snapshot_keep=keep)).run({"metric": "cosine", "dim": DIM})


def fresh(parts: tuple) -> Searcher:
    searcher = Searcher(*parts)
    searcher.load()
    return searcher


def answers(searcher: Searcher) -> list[list[tuple[int, float]]]:
    return searcher.search_many(QUERIES, 40)


def history(parts: tuple, keep: int = 2) -> tuple[dict, dict]:
    """Two snapshots (the log trimmed to the older one's watermark), then later commits."""
    commit_segment(parts, "a", list(range(1, 11)), seed=1)
    commit_tombstone(parts, 3)
    first = compact(parts, keep)
    commit_segment(parts, "b", list(range(11, 21)), seed=2)
    commit_tombstone(parts, 12)
    second = compact(parts, keep)
    commit_segment(parts, "c", list(range(21, 31)), seed=3)
    commit_tombstone(parts, 25)
    return first, second


def damage(store: ObjectStore, key: str, how: str) -> None:
    data = store.get(key)
    if how == "truncate":
        changed = data[: len(data) // 2]
    elif how == "flip":  # one bit, in the middle: the size stays right, only a checksum tells
        middle = len(data) // 2
        changed = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
    else:
        changed = how.encode()
    assert changed != data
    store.put(key, changed)


def damaged_keys(parts: tuple) -> dict[str, dict]:
    return integrity.damaged(parts[1].r, parts[2])


def alter_manifest(store: ObjectStore, base: str) -> None:
    manifest = json.loads(store.get(f"{base}/manifest.json"))
    manifest["count"] += 1  # still valid JSON with every field: only its checksum tells
    store.put(f"{base}/manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize(
    "name,how",
    [
        ("index.faiss", "truncate"),
        ("index.faiss", "flip"),
        ("ids.bits", "flip"),
        ("tombstones.npy", "truncate"),
        ("manifest.json", "truncate"),
        ("manifest.json", "alter"),
    ],
)
def test_damaged_snapshot_falls_back_to_the_previous_one(parts: tuple, name: str, how: str) -> None:
    store, coord, layout = parts
    first, second = history(parts)
    expected = answers(fresh(parts))
    assert fresh(parts).snapshot_watermark == second["watermark"]
    key = f"{second['path']}/{name}"
    if how == "alter":
        alter_manifest(store, second["path"])
    else:
        damage(store, key, how)

    searcher = fresh(parts)
    assert searcher.snapshot_watermark == first["watermark"]  # the older snapshot plus the commits after it
    assert answers(searcher) == expected  # same ids, same distances
    assert len(searcher) == 30 - 3
    health = searcher.health()
    assert health["degraded"] is False and [d["key"] for d in health["damaged"]] == [key]
    recorded = damaged_keys(parts)
    assert list(recorded) == [key] and recorded[key]["by"].startswith("searcher@")
    word = {"truncate": "truncated" if name != "manifest.json" else "not valid JSON", "flip": "sha256"}
    assert word.get(how, "checksum mismatch") in recorded[key]["reason"]


def test_unreadable_pointer_falls_back_by_listing(parts: tuple) -> None:
    store, _, layout = parts
    _, second = history(parts)
    expected = answers(fresh(parts))
    store.put(layout.snapshot_pointer, b'{"path": "collec')
    searcher = fresh(parts)
    assert searcher.snapshot_watermark == second["watermark"] and answers(searcher) == expected
    assert layout.snapshot_pointer in damaged_keys(parts)


def test_no_usable_snapshot_fails_clearly_when_the_log_was_trimmed(parts: tuple) -> None:
    store, _, _ = parts
    first, second = history(parts)
    damage(store, f"{second['path']}/index.faiss", "flip")
    damage(store, f"{first['path']}/index.faiss", "truncate")
    with pytest.raises(StoreDamaged, match="no usable snapshot"):
        fresh(parts)
    assert len(damaged_keys(parts)) == 2


def test_no_usable_snapshot_replays_a_complete_log(parts: tuple) -> None:
    store, _, _ = parts
    commit_segment(parts, "a", list(range(1, 11)), seed=1)
    commit_tombstone(parts, 3)
    only = compact(parts)  # the first snapshot: the log is kept whole until there are two
    commit_segment(parts, "b", list(range(11, 21)), seed=2)
    expected = answers(fresh(parts))
    damage(store, f"{only['path']}/index.faiss", "truncate")
    searcher = fresh(parts)
    assert searcher.snapshot_watermark == 0 and answers(searcher) == expected


def test_damaged_segment_is_skipped_loudly_and_never_compacted(parts: tuple) -> None:
    store, coord, layout = parts
    _, second = history(parts)
    healthy = fresh(parts)
    commit_segment(parts, "d", list(range(31, 41)), seed=4)
    damage(store, layout.segment("d"), "flip")  # decodes fine (uncompressed npz): only the checksum tells
    commit_segment(parts, "e", list(range(41, 51)), seed=5)
    damage(store, layout.segment("e"), "truncate")
    commit_segment(parts, "f", list(range(51, 61)), seed=6)

    for searcher in (healthy, fresh(parts)):  # a live searcher applying them, and one starting now
        hits = answers(searcher)
        found = {i for row in hits for i, _ in row}
        assert found & set(range(51, 61)) and not found & set(range(31, 51))  # served without them
        assert len(searcher) == 27 + 10
        health = searcher.health()
        assert health["degraded"] is True
        assert {d["key"] for d in health["damaged"]} == {layout.segment("d"), layout.segment("e")}
    recorded = damaged_keys(parts)
    assert "sha256" in recorded[layout.segment("d")]["reason"]
    assert "truncated" not in recorded[layout.segment("d")]["reason"]
    assert recorded[layout.segment("e")]["reason"]

    # A compaction refuses to bake them in: the pointer stays, nothing is collected.
    with pytest.raises(StoreDamaged, match="segments/d.npz"):
        compact(parts)
    assert json.loads(store.get(layout.snapshot_pointer))["path"] == second["path"]
    assert store.exists(layout.segment("c"))


def test_damaged_tombstone_still_removes(parts: tuple) -> None:
    store, _, layout = parts
    commit_segment(parts, "a", list(range(1, 11)), seed=1)
    commit_tombstone(parts, 4)
    store.put(layout.tombstone(4), b"garbage")
    searcher = fresh(parts)
    assert 4 not in {i for row in answers(searcher) for i, _ in row} and len(searcher) == 9
    assert searcher.health()["degraded"] is False
    assert layout.tombstone(4) in damaged_keys(parts)
    manifest = compact(parts)
    assert manifest["count"] == 9 and manifest["tombstones"] == 1


def test_compaction_builds_on_the_older_snapshot_and_repairs_the_damaged_one(parts: tuple) -> None:
    store, coord, layout = parts
    first, second = history(parts)
    expected = answers(fresh(parts))
    damage(store, f"{second['path']}/tombstones.npy", "flip")
    live = fresh(parts)
    assert live.snapshot_watermark == first["watermark"]
    third = compact(parts)  # from the first snapshot: never from the damaged one
    assert third["watermark"] > second["watermark"] and third["count"] == 27
    restarted = fresh(parts)
    assert restarted.snapshot_watermark == third["watermark"] and answers(restarted) == expected
    assert restarted.health() == {}
    # GC dropped the damaged version (it does not count as one of the two kept) and what only it had.
    assert not list(store.list(second["path"] + "/"))
    assert store.exists(f"{first['path']}/manifest.json")
    assert damaged_keys(parts) == {}
    deadline = time.monotonic() + 10  # the live one swaps the new snapshot in
    while live.snapshot_watermark != third["watermark"] and time.monotonic() < deadline:
        live.refresh(force=True)
        time.sleep(0.05)
    assert live.snapshot_watermark == third["watermark"] and answers(live) == expected


def test_compaction_rewrites_a_damaged_newest_snapshot_in_place(parts: tuple) -> None:
    store, _, _ = parts
    _, second = history(parts)
    compact(parts)  # the third snapshot takes in "c"; nothing is committed after it
    third = json.loads(store.get(Layout().snapshot_pointer))
    expected = answers(fresh(parts))
    damage(store, f"{third['path']}/index.faiss", "flip")
    assert fresh(parts).snapshot_watermark == second["watermark"]
    again = compact(parts)  # same watermark: the damaged version is written again, whole
    assert again["path"] == third["path"] and "skipped" not in again
    searcher = fresh(parts)
    assert searcher.snapshot_watermark == third["watermark"] and searcher.health() == {}
    assert answers(searcher) == expected and damaged_keys(parts) == {}


def test_gc_keeps_what_the_oldest_kept_snapshot_needs(parts: tuple) -> None:
    store, coord, layout = parts
    first, second = history(parts, keep=3)
    third = compact(parts, keep=3)
    commit_segment(parts, "d", list(range(31, 41)), seed=4)
    expected = answers(fresh(parts))
    # Three kept: the log still holds every commit after the oldest one's watermark.
    assert [s for s, _ in coord.commits_after(0)][0] == first["watermark"] + 1
    for snapshot in (third, second):
        damage(store, f"{snapshot['path']}/index.faiss", "flip")
    searcher = fresh(parts)
    assert searcher.snapshot_watermark == first["watermark"] and answers(searcher) == expected
    assert store.exists(layout.segment("b"))


def test_a_half_written_snapshot_is_never_read_and_is_collected(parts: tuple) -> None:
    """What a compaction killed before its pointer leaves: files and vectors, no manifest, no pointer."""
    store, coord, layout = parts
    _, second = history(parts)
    expected = answers(fresh(parts))
    half = layout.snapshot(coord.last_sequence())
    store.put(f"{half}/index.faiss", b"half of an index")
    orphan = f"{layout.root}/vectors/{half.rsplit('/', 1)[-1]}-00000.npz"
    store.put(orphan, b"half of the vectors")
    searcher = fresh(parts)
    assert searcher.snapshot_watermark == second["watermark"] and answers(searcher) == expected
    assert damaged_keys(parts) == {}  # not damage: it was never published
    third = compact(parts)
    assert third["path"] == half  # written again, whole, and published
    assert fresh(parts).snapshot_watermark == third["watermark"]


def test_live_searcher_keeps_serving_when_a_newer_snapshot_is_damaged(parts: tuple) -> None:
    store, coord, layout = parts
    _, second = history(parts)
    live = fresh(parts)
    expected = answers(live)
    third = compact(parts)  # a third snapshot, damaged before the live searcher loads it
    damage(store, f"{third['path']}/index.faiss", "truncate")
    for _ in range(40):
        live.refresh(force=True)
        time.sleep(0.05)
    assert live.published_seen == third["watermark"]  # looked at once, not retried in a loop
    assert answers(live) == expected
    assert f"{third['path']}/index.faiss" in damaged_keys(parts)


@pytest.fixture
def s3_parts(
    redis_client: redis.Redis, s3_endpoint: str
) -> Iterator[tuple[ObjectStore, Coordinator, Layout]]:
    settings = Settings(
        **s3_store(s3_endpoint, f"s3://damage-{uuid.uuid4().hex[:8]}/pupyl"),
    )
    layout = Layout()
    yield open_store(settings), Coordinator(redis_client, layout), layout


@pytest.mark.parametrize("name", ["index.faiss", "manifest.json"])
def test_damage_through_s3(s3_parts: tuple, name: str) -> None:
    store, _, layout = s3_parts
    first, second = history(s3_parts)
    commit_segment(s3_parts, "d", list(range(31, 41)), seed=4)
    damage(store, layout.segment("d"), "truncate")
    expected = answers(fresh(s3_parts))
    damage(store, f"{second['path']}/{name}", "flip")
    searcher = fresh(s3_parts)
    assert searcher.snapshot_watermark == first["watermark"] and answers(searcher) == expected
    assert searcher.health()["degraded"] is True
    assert set(damaged_keys(s3_parts)) == {f"{second['path']}/{name}", layout.segment("d")}


class Answered:
    """A shard's answer as the router receives it, called in process: this checks the merge; the Celery
    hop between router and shards runs with real workers in tests/test_sharding.py."""

    def __init__(self, value: dict) -> None:
        self.value = value

    def get(self, timeout: float, disable_sync_subtasks: bool = True) -> dict:  # noqa: ARG002
        return self.value


def test_damage_reaches_the_caller_through_shards_and_nearest(
    parts: tuple, redis_url: str, tmp_path: Path
) -> None:
    """Each shard's searcher routes around a damaged segment; the merged answer still says so."""
    from pupyl_queue.queries import nearest
    from pupyl_queue.runtime import Runtime
    from pupyl_queue.sharding import fan_out, shard_search

    store, coord, layout = parts
    history(parts)
    commit_segment(parts, "d", list(range(31, 41)), seed=4)
    damage(store, layout.segment("d"), "flip")
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, store=store.url, search_shards=2)
    shards = [Runtime(settings.replace(search_shard=k)) for k in range(2)]
    router = Runtime(settings)

    def send(k: int, request: dict) -> Answered:
        return Answered(shard_search(shards[k], request))

    hits, info = fan_out(router, layout.collection, QUERIES, 10, {}, send)
    assert info["degraded"] is True and not info["partial"]
    assert [d["key"] for d in info["damaged"]] == [layout.segment("d")]
    assert not {i for row in hits for i, _ in row} & set(range(31, 41))
    one = nearest(router, {"collection": layout.collection, **encode_vectors(QUERIES)}, send)
    assert one["degraded"] is True and [d["key"] for d in one["damaged"]] == [layout.segment("d")]
    alone = nearest(
        Runtime(settings.replace(search_shards=1)),
        {"collection": layout.collection, **encode_vectors(QUERIES)},
    )
    assert alone["degraded"] is True and len(alone["nearest"]) == len(QUERIES)
