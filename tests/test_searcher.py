"""The searcher and compaction against a real Redis and a real local store, no workers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.codecs import encode_segment
from pupyl_queue.compaction import Compactor
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.models import normalize
from pupyl_queue.queries import search
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import Searcher, SnapshotDamaged
from pupyl_queue.settings import Settings
from pupyl_queue.store import LocalStore
from pupyl_queue.vector_index import index_bytes

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


def compact(parts: tuple, **settings: object) -> dict:
    store, coord, _ = parts
    return Compactor(store, coord, Settings(**settings)).run({"metric": "cosine", "dim": DIM})  # type: ignore[arg-type]


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
    manifest = compact(parts)
    assert (manifest["watermark"], manifest["count"], manifest["factory"]) == (2, 19, "Flat")
    commit_segment(parts, "b", list(range(21, 31)), seed=2)
    commit_tombstone(parts, 25)
    commit_tombstone(parts, 6)
    from_snapshot = fresh(parts)
    assert from_snapshot.snapshot_watermark == 2 and from_snapshot.sequence == 5 and len(from_snapshot) == 27
    store.delete(layout.snapshot_pointer)  # a searcher that replays the whole log agrees exactly
    replay = fresh(parts)
    for q in vectors[:5]:
        assert from_snapshot.search(q, 10) == replay.search(q, 10)


def test_trained_index_past_the_threshold(parts: tuple) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, DIM))
    for batch in range(4):
        store, coord, layout = parts
        ids = np.arange(batch * 500 + 1, batch * 500 + 501)
        vectors = normalize(centers[rng.integers(0, 10, 500)] + 0.3 * rng.normal(size=(500, DIM)))
        store.put(layout.segment(f"s{batch}"), encode_segment(ids, vectors))
        coord.publish(layout.segment(f"s{batch}"))
    live = fresh(parts)
    manifest = compact(parts, flat_below=1000, index_nprobe=8)
    assert manifest["factory"].startswith("IVF") and manifest["count"] == 2000
    restarted = fresh(parts)
    assert restarted.index is not None and restarted.index.factory == manifest["factory"]
    queries = normalize(centers + 0.3 * rng.normal(size=centers.shape))
    recall = np.mean(
        [
            len({i for i, _ in a} & {i for i, _ in b}) / 10
            for a, b in zip(live.search_many(queries, 10), restarted.search_many(queries, 10))
        ]
    )
    assert recall >= 0.9


def test_searcher_swaps_in_a_new_snapshot_and_gc_keeps_it_whole(parts: tuple) -> None:
    store, coord, layout = parts
    vectors = commit_segment(parts, "a", list(range(1, 11)), seed=1)
    live = fresh(parts)
    first = compact(parts)
    commit_segment(parts, "b", list(range(11, 21)), seed=2)
    second = compact(parts)
    commit_segment(parts, "c", list(range(21, 31)), seed=3)
    third = compact(parts)
    # the segment inside the first snapshot is gone; the snapshot before the newest stays whole
    assert not store.exists(layout.segment("a")) and not store.exists(layout.segment("b"))
    assert not list(store.list(first["path"] + "/"))
    assert store.exists(second["path"] + "/manifest.json") and store.exists(third["path"] + "/index.faiss")
    assert [key for _, key in coord.commits_after(0)] == [layout.segment("c")]  # the log is trimmed
    deadline = time.monotonic() + 10
    while live.snapshot_watermark != third["watermark"] and time.monotonic() < deadline:
        live.refresh(force=True)
        time.sleep(0.05)
    assert live.snapshot_watermark == third["watermark"] and len(live) == 30
    restarted = fresh(parts)
    assert len(restarted) == 30 and restarted.search(vectors[0], 5) == live.search(vectors[0], 5)


def test_compaction_under_concurrent_inserts_and_searches_loses_nothing(parts: tuple) -> None:
    store, coord, layout = parts
    commit_segment(parts, "first", list(range(1, 101)), seed=0)
    live = fresh(parts)
    stop = threading.Event()
    errors: list[BaseException] = []

    def insert() -> None:
        for n in range(1, 30):
            commit_segment(parts, f"more{n}", list(range(100 * n + 1, 100 * n + 101)), seed=n)
            if n % 7 == 0:
                commit_tombstone(parts, 100 * n + 5)

    def search() -> None:
        query = normalize(np.ones((1, DIM)))[0]
        while not stop.is_set():
            try:
                live.search(query, 5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=insert), threading.Thread(target=search)]
    for t in threads:
        t.start()
    compact(parts)
    threads[0].join()
    compact(parts)
    stop.set()
    threads[1].join()
    assert not errors
    expected = 3000 - 4  # 30 segments of 100, 4 removed (n = 7, 14, 21, 28)
    assert len(fresh(parts)) == expected
    live.refresh(force=True)
    assert len(live) == expected


def test_damaged_snapshot_is_detected(parts: tuple) -> None:
    """Detected, reported, and routed around (more in test_store_damage.py)."""
    store, _, layout = parts
    commit_segment(parts, "a", [1, 2], seed=1)
    base = compact(parts)["path"]
    data = store.get(f"{base}/index.faiss")
    store.put(f"{base}/index.faiss", data[:-10])
    searcher = fresh(parts)  # the only snapshot is damaged: the whole log is replayed instead
    assert searcher.snapshot_watermark == 0 and len(searcher) == 2
    assert searcher.health()["damaged"][0]["key"] == f"{base}/index.faiss"
    store.delete(layout.segment("a"))  # and without the log, loading fails clearly
    parts[1].trim_commits(1)
    with pytest.raises(SnapshotDamaged, match="no usable snapshot"):
        fresh(parts)


def test_wait_for_sequence(parts: tuple) -> None:
    searcher = fresh(parts)
    assert searcher.wait_for(1, timeout=0.1) is False
    commit_segment(parts, "a", [1], seed=1)
    assert searcher.wait_for(1, timeout=1) is True


class MetaBarrier(LocalStore):
    """A local store whose first ``parties`` metadata GETs each wait for the others: fetched one after
    the other, the first waits alone and the barrier breaks (after ``timeout``, a guard, not a timing)."""

    def __init__(self, root: Path, parties: int, timeout: float = 10) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=timeout)
        self.left = parties
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes:
        if key.endswith(".json") and f"/{C.STORE_IMAGES}/" in key:
            with self.lock:
                wait, self.left = self.left > 0, self.left - 1
            if wait:
                self.barrier.wait()
        return super().get(key)


def test_search_fetches_the_hits_metadata_concurrently(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))
    rt.__dict__["store"] = store = MetaBarrier(tmp_path / "store", parties=4)
    layout = Layout()
    parts = (store, rt.coordinator(layout.collection), layout)
    commit_segment(parts, "a", list(range(1, 9)), seed=1)
    for image_id in range(1, 9):
        store.put(
            layout.image_meta(image_id), json.dumps({"id": image_id, "name": f"{image_id}.jpg"}).encode()
        )
    store.delete(layout.image_meta(8))  # removed meanwhile: None, as before
    answer = search(rt, {"collection": layout.collection, "query": {"id": 3}, "top": 8, "metadata": True})
    rows = answer["results"]
    assert [row["id"] for row in rows][0] == 3 and len(rows) == 8
    assert all(
        row["metadata"] == {"id": row["id"], "name": f"{row['id']}.jpg"} for row in rows if row["id"] != 8
    )
    assert next(row["metadata"] for row in rows if row["id"] == 8) is None
    assert store.barrier.n_waiting == 0 and not store.barrier.broken


class SnapshotWatch(LocalStore):
    """A local store that notes, each time a snapshot's index file is fetched, whether the watched
    searcher still holds its live index, and what the runtime counts against its budget then."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.watch: tuple[Runtime, Searcher] | None = None
        self.seen: list[tuple[bool, int]] = []

    def get_file(self, key: str, path: str | Path) -> None:
        if key.endswith("/index.faiss") and self.watch is not None:
            rt, searcher = self.watch
            self.seen.append((searcher.index is not None, rt.index_bytes()))
        super().get_file(key, path)


@pytest.mark.parametrize("room_for_two", [True, False])
def test_snapshot_swap_stays_within_the_search_memory_budget(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, room_for_two: bool
) -> None:
    """Room for two indexes: the new one loads beside the live one (searches go on), and counts.
    No room: the live index is dropped before the new one loads. Either way the swap ends whole."""
    store = SnapshotWatch(tmp_path / "store")
    layout = Layout()
    parts = (store, Coordinator(redis_client, layout), layout)
    commit_segment(parts, "a", list(range(1, 1001)), seed=1)
    compact(parts)
    one_index = index_bytes(2000, "Flat", DIM, 2048)  # the live state at swap time, and the new snapshot
    budget = 10 * one_index if room_for_two else int(1.5 * one_index)
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, search_memory_gb=budget / 1024**3))
    rt.__dict__["store"] = store
    searcher = rt.searcher(layout.collection)
    vectors = commit_segment(parts, "b", list(range(1001, 2001)), seed=2)
    live = searcher.search(vectors[0], 3)
    assert len(searcher) == 2000 and rt.index_bytes() == searcher.index.memory_bytes() <= budget
    newest = compact(parts)["watermark"]
    store.watch = (rt, searcher)
    deadline = time.monotonic() + 30
    while searcher.snapshot_watermark != newest and time.monotonic() < deadline:
        searcher.refresh(force=True)  # starts the swap (once), then waits for it
        time.sleep(0.02)
    assert searcher.snapshot_watermark == newest and len(searcher) == 2000
    assert searcher.search(vectors[0], 3) == live
    assert len(store.seen) == 1
    held_live, counted = store.seen[0]
    if room_for_two:
        assert held_live and counted >= 2 * one_index - 4096  # both indexes are counted while it loads
    else:
        assert not held_live and counted <= budget  # never two at once
    assert rt.index_bytes() == searcher.index.memory_bytes() <= budget


class CollectDuringLoad(LocalStore):
    """A local store where, the first time a snapshot's index file is fetched, compactions publish
    ``newer`` snapshots first: with PUPYL_SNAPSHOT_KEEP=1, GC deletes the one being loaded."""

    def __init__(self, root: Path, newer: int) -> None:
        super().__init__(root)
        self.newer = newer
        self.parts: tuple | None = None

    def get_file(self, key: str, path: str | Path) -> None:
        if key.endswith("/index.faiss") and self.parts is not None and self.newer > 0:
            self.newer -= 1
            batch = self.newer
            commit_segment(self.parts, f"late{batch}", [100 + batch], seed=10 + batch)
            compact(self.parts, snapshot_keep=1)
        super().get_file(key, path)


@pytest.mark.parametrize("newer", [1, 2])  # collected once; collected again while loading its successor
def test_snapshot_collected_while_loading_is_not_damage(
    redis_client: redis.Redis, tmp_path: Path, newer: int
) -> None:
    store = CollectDuringLoad(tmp_path, newer)
    layout = Layout()
    parts = (store, Coordinator(redis_client, layout), layout)
    commit_segment(parts, "a", list(range(1, 21)), seed=1)
    first = compact(parts, snapshot_keep=1)
    store.parts = parts
    searcher = fresh(parts)
    assert not store.exists(f"{first['path']}/manifest.json")  # GC did collect it under the reader
    assert searcher.health() == {} and integrity.damaged(redis_client, layout) == {}
    assert searcher.snapshot_watermark == parts[1].snapshot_watermark() and len(searcher) == 20 + newer


def test_a_failed_in_place_reload_fails_searches_instead_of_answering_empty(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """No room for two, so the live index is dropped first; when no snapshot then loads (both damaged,
    the log trimmed), a search raises StoreDamaged: it never answers from the empty state."""
    store = LocalStore(tmp_path / "store")
    layout = Layout()
    parts = (store, Coordinator(redis_client, layout), layout)
    commit_segment(parts, "a", list(range(1, 101)), seed=1)
    older = compact(parts)
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, search_memory_gb=1e-9))
    rt.__dict__["store"] = store
    searcher = rt.searcher(layout.collection)
    vectors = commit_segment(parts, "b", list(range(101, 201)), seed=2)
    assert len(searcher.search(vectors[0], 3)) == 3
    newer = compact(parts)
    for manifest in (older, newer):
        store.put(f"{manifest['path']}/index.faiss", b"damaged")
    searcher.refresh(force=True)  # starts the reload in place (a thread), which fails
    deadline = time.monotonic() + 30
    while (searcher._swapping or not searcher._unloaded) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert searcher._unloaded and not searcher._swapping and searcher.index is None
    with pytest.raises(SnapshotDamaged, match="no usable snapshot"):
        searcher.search(vectors[0], 3)
