"""Two live runs of one embed batch never rewrite its committed segment (issue 15; write_claim.py).

Seen in tests/test_faults.py with PUPYL_EMBED_CONCURRENCY=2: a batch delivered twice ran in both
threads of one embed worker at once; both found its segment uncommitted, and the second wrote it
after the first had committed it, with other bytes: a committed segment that failed its checksum.
Here the two runs are embed_batch in two threads of this process, against a real Redis and a real
store whose segment puts are held so that the runs interleave exactly that way when they can.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.coordination import Coordinator, WriteClaimLost
from pupyl_queue.embedding import embed_batch
from pupyl_queue.keys import retire
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectStore
from pupyl_queue.write_claim import WriteClaim
from tests.faults import assert_exactly_once, audit
from tests.imagegen import encode, pattern
from tests.indexing import expand_folder

HOLD_S = 3  # how long a segment put waits for the other run's, before going on alone


@pytest.fixture
def rt(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    url = redis_url.rsplit("/", 1)[0] + "/8"  # as tests/test_redelivery.py: both flush it before and after
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield Runtime(Settings(data_dir=tmp_path, redis_url=url, batch_size=4))
    client.flushdb()
    client.close()


class InterleavingStore:
    """The real store, with each segment (or ``folder``) put held until the other run's arrives (or
    HOLD_S passes); of two that arrive, the second goes only once the first one's commit is in
    Redis. That is the interleaving that damaged a segment: both runs past the "committed?" check,
    one commits, the other writes after it."""

    def __init__(self, store: ObjectStore, coord: Coordinator, folder: str = "/segments/") -> None:
        self.store = store
        self.coord = coord
        self.folder = folder  # the objects whose puts are held
        self.puts: Counter[str] = Counter()
        self.both_arrived = threading.Barrier(2, timeout=HOLD_S)
        self.lock = threading.Lock()
        self.first: str | None = None  # the thread whose segment put went first

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put(self, key: str, data: bytes) -> None:
        with self.lock:
            self.puts[key] += 1
        if self.folder in key:
            # A broken barrier: the other run never came to write (it waited for this one's commit).
            with contextlib.suppress(threading.BrokenBarrierError):
                self.both_arrived.wait()
            with self.lock:
                second = self.first is not None
                self.first = self.first or threading.current_thread().name
            if second:
                deadline = time.monotonic() + 10
                while not integrity.is_committed(self.coord, key) and time.monotonic() < deadline:
                    time.sleep(0.01)
        self.store.put(key, data)


def photos(folder: Path, count: int) -> dict[Path, str]:
    import hashlib

    folder.mkdir()
    files = {}
    for seed in range(count):
        path = folder / f"{seed}.png"
        path.write_bytes(encode(pattern(seed), "PNG"))
        files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def test_two_live_runs_of_one_batch_write_its_segment_once(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    files = photos(tmp_path / "imgs", 6)
    batches = expand_folder(rt, tmp_path / "imgs", tiny_model, job_id="j1")
    assert len(batches) >= 2
    reports = embed_batch(rt, batches[0])["items"]  # loads the model and the scripts, outside the race
    layout = Layout()
    coord = rt.coordinator("default")
    store = InterleavingStore(rt.store, coord)
    rt.__dict__["store"] = store
    twice = batches[1]
    with ThreadPoolExecutor(2, thread_name_prefix="run") as pool:
        runs = [pool.submit(embed_batch, rt, dict(twice)) for _ in range(2)]
        results = [run.result(timeout=60) for run in runs]
    reports += next(r["items"] for r in results if "items" in r)  # the other may answer as finished
    for batch in batches[2:]:
        reports += embed_batch(rt, batch)["items"]
    rt.__dict__["store"] = store.store

    segment = layout.segment(f"j1-{twice['batch']:06d}")
    assert results[0]["sequence"] == results[1]["sequence"] > 0
    assert results[0]["indexed"] == results[1]["indexed"] == len(twice["items"])
    recorded = rt.redis.hget(layout.key(C.KEY_CHECKSUMS), segment)
    assert recorded is not None
    assert integrity.problem(rt.store.get(segment), recorded) is None, "the committed segment was rewritten"
    assert store.puts[segment] == 1, store.puts
    assert store.puts[layout.batch_meta(f"j1-{twice['batch']:06d}")] == 1, store.puts
    assert not rt.redis.exists(coord.write_claim_key(segment)), "the commit let the claim go"
    found = audit(rt.store, rt.redis, "default", reports)
    assert_exactly_once(found, files, layout)


def test_a_dead_holders_claim_lapses_and_the_next_run_writes(rt: Runtime, tmp_path: Path) -> None:
    """A run that took the claim and died (no renewal): another waits for its lease, then writes."""
    coord = rt.coordinator("default")
    key = Layout().segment("j2-000000")
    dead = WriteClaim(coord, key, lease_s=0.5)
    assert coord.begin_write(key, dead.token, dead.lease_ms) == 0  # taken, and never renewed
    alive = WriteClaim(coord, key, lease_s=5)
    started = time.monotonic()
    assert alive.acquire() is True
    assert 0.2 < time.monotonic() - started < 5
    with pytest.raises(WriteClaimLost):
        coord.commit(key, images=1, checksum="a" * 64, writer=dead.token)  # the dead run, had it woken
    assert coord.last_sequence() == 0
    sequence, _ = coord.commit(key, images=1, checksum="b" * 64, writer=alive.token)
    alive.committed()
    assert sequence == 1 and not rt.redis.exists(coord.write_claim_key(key))
    assert WriteClaim(coord, key).acquire() is False  # committed: a later run writes nothing
    assert coord.commit(key, images=1)[0] == 1  # and gets the first run's answer


def test_a_claim_is_renewed_while_held_and_handed_over_on_failure(rt: Runtime) -> None:
    coord = rt.coordinator("default")
    key = Layout().segment("j3-000000")
    holder = WriteClaim(coord, key, lease_s=0.6)
    assert holder.acquire() is True
    time.sleep(1.5)  # more than twice its lease: renewed meanwhile
    assert rt.redis.get(coord.write_claim_key(key)) == holder.token
    waiter = WriteClaim(coord, key, lease_s=5, wait_s=0.3)
    with pytest.raises(Exception, match="held its write claim"):
        waiter.acquire()
    holder.release()  # it failed: the next run takes over at once
    assert not rt.redis.exists(coord.write_claim_key(key))
    successor = WriteClaim(coord, key, wait_s=0.1)
    assert successor.acquire() is True
    successor.release()  # its renewing thread stops here, not at the end of the test process


def test_two_runs_retiring_one_replaced_id_write_its_tombstone_once(rt: Runtime) -> None:
    """Both live runs of a keyed batch retire the ids its commit replaced, at the same moment."""
    coord = rt.coordinator("default")
    store = InterleavingStore(rt.store, coord, "/tombstones/")
    tombstone = Layout().tombstone(7)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(retire, store, coord, [(7, "sku-7")], {"sku-7": 9}) for _ in range(2)]  # type: ignore[arg-type]
        for run in runs:
            run.result(timeout=30)
    recorded = rt.redis.hget(Layout().key(C.KEY_CHECKSUMS), tombstone)
    assert recorded is not None
    assert integrity.problem(rt.store.get(tombstone), recorded) is None, (
        "the committed tombstone was rewritten"
    )
    assert store.puts[tombstone] == 1, store.puts
    assert [key for _, key in coord.commits_after(0)] == [tombstone]


def test_two_live_runs_of_one_attribute_update_write_its_segment_once(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """set_attributes' one-row segment: two live runs of one ``update_id`` (a redelivery while the
    first runs) write it once; its metadata object (attributes_updated_at) differs run to run."""
    from pupyl_queue.queries import set_attributes
    from tests.indexing import index_folder

    photos(tmp_path / "one", 1)
    first = index_folder(rt, tmp_path / "one", tiny_model, key="k", attributes={"color": "red"})[0]
    rt.searcher("default").vector(first["id"])  # loads the index, outside the race
    coord = rt.coordinator("default")
    store = InterleavingStore(rt.store, coord)
    rt.__dict__["store"] = store
    task = {"collection": "default", "key": "k", "attributes": {"color": "green"}, "update_id": "cd" * 8}
    with ThreadPoolExecutor(2, thread_name_prefix="run") as pool:
        runs = [pool.submit(set_attributes, rt, dict(task)) for _ in range(2)]  # type: ignore[arg-type]
        results = [run.result(timeout=60) for run in runs]
    rt.__dict__["store"] = store.store

    layout, owner = Layout(), f"{'cd' * 8}-000000"
    segment = layout.segment(owner)
    assert [r["updated"] for r in results] == [True, True], results
    assert results[0]["id"] == results[1]["id"] != first["id"]
    assert results[0]["sequence"] == results[1]["sequence"] > 0
    recorded = rt.redis.hget(layout.key(C.KEY_CHECKSUMS), segment)
    assert recorded is not None
    assert integrity.problem(rt.store.get(segment), recorded) is None, "the committed segment was rewritten"
    assert store.puts[segment] == 1, store.puts
    assert store.puts[layout.batch_meta(owner)] == 1, store.puts
    assert not rt.redis.exists(coord.write_claim_key(segment)), "the commit let the claim go"
    assert coord.lookup("k")["id"] == results[0]["id"] and coord.image_count() == 1  # type: ignore[index]
