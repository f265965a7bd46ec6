"""The searcher's view of the commit log: real Redis, real local store, no workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.models import normalize
from pupyl_queue.searcher import Searcher, SnapshotDamaged, encode_segment
from pupyl_queue.store import LocalStore

DIM = 8


@pytest.fixture
def parts(redis_client: redis.Redis, tmp_path: Path) -> tuple[LocalStore, Coordinator, Layout]:
    layout = Layout()
    return LocalStore(tmp_path), Coordinator(redis_client, layout), layout


def commit_segment(parts: tuple, name: str, ids: list[int], seed: int) -> np.ndarray:
    store, coord, layout = parts
    vectors = normalize(np.random.default_rng(seed).normal(size=(len(ids), DIM)))
    store.put(layout.segment(name), encode_segment(np.array(ids), vectors))
    coord.publish(layout.segment(name))
    return vectors


def commit_tombstone(parts: tuple, image_id: int) -> int:
    store, coord, layout = parts
    store.put(layout.tombstone(image_id), json.dumps({"id": image_id}).encode())
    return coord.publish(layout.tombstone(image_id))


def fresh(parts: tuple) -> Searcher:
    searcher = Searcher(*parts)
    searcher.load()
    return searcher


def test_sees_every_commit_before_answering(parts: tuple) -> None:
    searcher = fresh(parts)
    assert len(searcher) == 0
    vectors = commit_segment(parts, "a", [1, 2, 3], seed=1)
    assert searcher.search(vectors[1], 1)[0][0] == 2  # applied on the search itself
    commit_segment(parts, "b", [4, 5], seed=2)
    assert len(searcher.search(vectors[0], 10)) == 5
    assert searcher.sequence == 2


def test_removal_wins_whatever_the_order(parts: tuple) -> None:
    commit_tombstone(parts, 2)  # the tombstone is committed before its segment
    vectors = commit_segment(parts, "a", [1, 2, 3], seed=1)
    searcher = fresh(parts)
    assert 2 not in [i for i, _ in searcher.search(vectors[1], 10)]
    commit_tombstone(parts, 3)
    assert [i for i, _ in searcher.search(vectors[1], 10)] == [1]


def test_snapshot_plus_later_commits_equals_replay(parts: tuple) -> None:
    store, _, layout = parts
    vectors = commit_segment(parts, "a", list(range(1, 21)), seed=1)
    commit_tombstone(parts, 5)
    manifest = fresh(parts).write_snapshot({"kind": "test", "metric": "cosine"})
    assert (manifest["watermark"], manifest["count"]) == (2, 19)
    commit_segment(parts, "b", list(range(21, 31)), seed=2)
    commit_tombstone(parts, 25)
    commit_tombstone(parts, 6)
    from_snapshot = fresh(parts)
    assert from_snapshot.sequence == 5 and len(from_snapshot) == 27
    # A searcher that replays the whole log (no snapshot) agrees exactly.
    store.delete(layout.snapshot_pointer)
    replay = fresh(parts)
    for q in vectors[:5]:
        assert from_snapshot.search(q, 10) == replay.search(q, 10)


def test_damaged_snapshot_is_detected(parts: tuple) -> None:
    store, _, layout = parts
    commit_segment(parts, "a", [1, 2], seed=1)
    fresh(parts).write_snapshot({"metric": "cosine"})
    base = json.loads(store.get(layout.snapshot_pointer))["path"]
    data = store.get(f"{base}/index.faiss")
    store.put(f"{base}/index.faiss", data[:-10])
    with pytest.raises(SnapshotDamaged):
        fresh(parts)


def test_wait_for_sequence(parts: tuple) -> None:
    searcher = fresh(parts)
    assert searcher.wait_for(1, timeout=0.1) is False
    commit_segment(parts, "a", [1], seed=1)
    assert searcher.wait_for(1, timeout=1) is True
