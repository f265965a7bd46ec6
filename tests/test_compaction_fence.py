"""The compaction lock's fencing token (issue #16 item 3): a run that lost its lock publishes nothing.

Real redis-server, the local store and S3 (a real moto_server). Run A compacts
through a TCP proxy to Redis and is held mid-way, its first vector file
written; the proxy then plays a Redis outage longer than the lock's lifetime
(A cannot renew it), and run B, which reaches Redis directly, takes the lock
over and publishes a newer snapshot. Before the fence, A then published its
own pointer over B's (backwards, to files B's GC had deleted as half-written).
The same with real Celery workers: tests/test_compaction_workers.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis

from pupyl_queue import integrity, queries
from pupyl_queue.codecs import encode_segment
from pupyl_queue.compaction import Compactor
from pupyl_queue.coordination import Coordinator
from pupyl_queue.fencing import CompactionLock, FencedOut
from pupyl_queue.layout import Layout
from pupyl_queue.models import normalize
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectStore
from tests.conftest import s3_store
from tests.faults import TcpProxy

DIM = 8
LOCK_S = 2


@pytest.fixture(params=["file", "s3"])
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> Settings:
    base = Settings(data_dir=tmp_path, redis_url=redis_url, compact_lock_s=LOCK_S, snapshot_keep=2)
    if request.param == "file":
        return base
    return base.replace(
        **s3_store(request.getfixturevalue("s3_endpoint"), f"s3://fence-{uuid.uuid4().hex[:8]}/pq"),
    )


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    proxy = TcpProxy((host, int(port)))
    yield proxy
    proxy.close()


def commit(rt: Runtime, name: str, ids: list[int]) -> int:
    """A segment committed as the embed stage commits one; returns its sequence number."""
    coord, layout = rt.coordinator("default"), Layout()
    vectors = normalize(np.random.default_rng(ids[0]).normal(size=(len(ids), DIM)))
    data = encode_segment(np.array(ids), vectors)
    rt.store.put(layout.segment(name), data)
    integrity.record_checksum(coord, layout.segment(name), data)
    return coord.publish(layout.segment(name), images=len(ids))


def pointer(store: ObjectStore) -> dict[str, Any]:
    return json.loads(store.get(Layout().snapshot_pointer))


def assert_whole(rt: Runtime, ids: int) -> None:
    """The published snapshot: every file there and matching its manifest; a reader finds every id."""
    store, layout = rt.store, Layout()
    manifest = integrity.open_manifest(store, pointer(store)["path"])
    for name in manifest["files"]:
        integrity.snapshot_file(store, manifest, name)
    for key in manifest["vector_files"]:
        integrity.read_checked(store, key, manifest["vector_sha256"][key])
    searcher = Searcher(store, Coordinator(rt.redis, layout), layout)
    searcher.load()
    assert searcher.health() == {} and len(searcher) == ids


def test_a_compaction_cut_from_redis_past_its_lock_publishes_nothing(
    settings: Settings, proxy: TcpProxy, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Runtime, "spec", lambda self, collection: SimpleNamespace(to_json=dict))
    direct = Runtime(settings)
    cut = Runtime(settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    layout = Layout()
    commit(direct, "a", list(range(1, 21)))
    first = queries.compact(direct, {"collection": "default"})
    a_target = commit(direct, "b", list(range(21, 41)))

    held, go = threading.Event(), threading.Event()
    put_index = Compactor._put_index

    def held_mid_way(self: Compactor, key: str, index: Any) -> tuple[str, int]:
        if threading.current_thread().name == "run-a":  # its vector file and bitmap are written
            held.set()
            assert go.wait(60)
        return put_index(self, key, index)

    monkeypatch.setattr(Compactor, "_put_index", held_mid_way)
    outcome: dict[str, Any] = {}

    def run_a() -> None:
        try:
            outcome["a"] = queries.compact(cut, {"collection": "default"})
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["a"] = exc

    thread = threading.Thread(target=run_a, name="run-a")
    thread.start()
    try:
        assert held.wait(60)
        a_folder = layout.snapshot(a_target)
        assert any(direct.store.list(a_folder + "/"))  # A's half-written output is in the store
        proxy.down()  # a Redis outage, for A only, longer than the lock's lifetime
        deadline = time.monotonic() + 30
        while redis_client.exists(layout.key("compact-lock")):
            assert time.monotonic() < deadline, "the lock never lapsed"
            time.sleep(0.1)
        b_target = commit(direct, "c", list(range(41, 61)))
        second = queries.compact(direct, {"collection": "default"})  # B: takes the lock over, publishes
        assert second["watermark"] == b_target > a_target > first["watermark"]
        proxy.up()
        cut.redis.connection_pool.disconnect()  # its sockets were cut: reconnect, as after any outage
    finally:
        go.set()
        thread.join(60)

    # A stopped at its next write: nothing of it published, B's snapshot intact and still the newest.
    assert pointer(direct.store)["path"] == layout.snapshot(b_target)  # not moved back to A's
    assert isinstance(outcome["a"], dict), outcome
    assert "lost the compaction lock" in outcome["a"].get("skipped", ""), outcome["a"]
    assert pointer(direct.store)["version"] > 0
    assert Coordinator(redis_client, layout).snapshot_watermark() == b_target
    assert_whole(direct, 60)
    assert not direct.store.exists(f"{a_folder}/manifest.json")

    # The next compaction collects whatever A left, and the one after it still builds on B's.
    commit(direct, "d", list(range(61, 71)))
    third = queries.compact(direct, {"collection": "default"})
    assert "skipped" not in third
    assert not list(direct.store.list(a_folder + "/"))
    assert not [
        k for k in direct.store.list(f"{layout.root}/vectors/") if k.split("/")[-1].startswith(a_folder[-16:])
    ]
    assert_whole(direct, 70)


def test_a_lapsed_lock_nobody_took_is_taken_back(settings: Settings, redis_client: redis.Redis) -> None:
    """A run whose lock lapsed while no other run started goes on: nothing was written by another."""
    rt = Runtime(settings)
    lock = CompactionLock(rt.redis, rt.store, Layout(), ttl_s=LOCK_S)
    assert lock.acquire()
    redis_client.delete(Layout().key("compact-lock"))  # lapsed (a stall), nobody else took it
    lock.check()
    assert redis_client.get(Layout().key("compact-lock")) == str(lock.token)
    other = CompactionLock(rt.redis, rt.store, Layout(), ttl_s=LOCK_S)
    assert not other.acquire()  # held again
    redis_client.delete(Layout().key("compact-lock"))
    assert other.acquire() and other.token > lock.token  # this time another run took it over
    with pytest.raises(FencedOut):
        lock.check()
    with pytest.raises(FencedOut):
        lock.claim(1, "x")


def test_tokens_stay_above_the_published_version_when_redis_lost_its_data(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Runtime, "spec", lambda self, collection: SimpleNamespace(to_json=dict))
    rt = Runtime(settings)
    commit(rt, "a", list(range(1, 11)))
    for _ in range(3):
        CompactionLock(rt.redis, rt.store, Layout(), ttl_s=LOCK_S).acquire()  # tokens 1..3, never released
        redis_client.delete(Layout().key("compact-lock"))
    queries.compact(rt, {"collection": "default"})
    published = pointer(rt.store)["version"]
    assert published == 4
    redis_client.flushdb()  # Redis lost everything; the store still says version 4
    lock = CompactionLock(rt.redis, rt.store, Layout(), ttl_s=LOCK_S)
    assert lock.acquire() and lock.token == published + 1


def test_gc_of_a_run_that_lost_its_lock_keeps_the_newer_runs_half_written_output(
    settings: Settings, proxy: TcpProxy, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publishes, is cut from Redis in its GC past the lock's lifetime; B takes over and is mid-write."""
    monkeypatch.setattr(Runtime, "spec", lambda self, collection: SimpleNamespace(to_json=dict))
    direct = Runtime(settings)
    cut = Runtime(settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    layout = Layout()
    commit(direct, "a", list(range(1, 21)))
    queries.compact(direct, {"collection": "default"})
    a_target = commit(direct, "b", list(range(21, 41)))

    a_in_gc, a_go, b_writing, b_go = (threading.Event() for _ in range(4))
    collect, put_index, children = Compactor._collect_garbage, Compactor._put_index, cut.store.children

    gc = threading.local()

    def held_collect(self: Compactor) -> None:
        gc.running = True
        try:
            return collect(self)
        finally:
            gc.running = False

    def held_children(prefix: str) -> list[str]:  # A's GC, after its lock check, before it lists
        if (
            getattr(gc, "running", False)
            and threading.current_thread().name == "run-a"
            and not a_in_gc.is_set()
        ):
            a_in_gc.set()
            assert a_go.wait(60)
        return children(prefix)

    def held_put_index(self: Compactor, key: str, index: Any) -> tuple[str, int]:
        if threading.current_thread().name == "run-b":  # B's vector file and bitmap are written
            b_writing.set()
            assert b_go.wait(60)
        return put_index(self, key, index)

    monkeypatch.setattr(Compactor, "_collect_garbage", held_collect)
    monkeypatch.setattr(Compactor, "_put_index", held_put_index)
    monkeypatch.setattr(cut.store, "children", held_children)
    outcome: dict[str, Any] = {}

    def run(name: str, rt: Runtime) -> threading.Thread:
        def body() -> None:
            try:
                outcome[name] = queries.compact(rt, {"collection": "default"})
            except Exception as exc:  # noqa: BLE001 - checked below
                outcome[name] = exc

        thread = threading.Thread(target=body, name=f"run-{name}")
        thread.start()
        return thread

    threads = [run("a", cut)]
    try:
        assert a_in_gc.wait(60)
        assert pointer(direct.store)["path"] == layout.snapshot(a_target)  # A published, then stalled
        proxy.down()
        deadline = time.monotonic() + 30
        while redis_client.exists(layout.key("compact-lock")):
            assert time.monotonic() < deadline, "the lock never lapsed"
            time.sleep(0.1)
        b_target = commit(direct, "c", list(range(41, 61)))
        threads.append(run("b", direct))
        assert b_writing.wait(60)
        b_output = list(direct.store.list(layout.snapshot(b_target) + "/"))
        assert b_output  # B's half-written version, no manifest yet
        proxy.up()
        cut.redis.connection_pool.disconnect()
        a_go.set()
        threads[0].join(60)
        assert list(direct.store.list(layout.snapshot(b_target) + "/")) == b_output  # A's GC left it
    finally:
        a_go.set()
        b_go.set()
        for thread in threads:
            thread.join(60)
    assert outcome["b"]["watermark"] == b_target, outcome
    assert pointer(direct.store)["path"] == layout.snapshot(b_target)
    assert_whole(direct, 60)
