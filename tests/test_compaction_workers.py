"""Two maintenance workers, and a compaction whose lock lapses mid-run (issue #16 item 3).

Real redis-server, real Celery worker processes, the local store. Worker A is
frozen (SIGSTOP: a stall, or a cut from Redis, longer than the lock's 3 s) after
its compaction wrote the first file of its new version. Its lock lapses; worker B
takes it and publishes a newer snapshot. A is then thawed. Before the fencing
token A went on, published its older snapshot over B's (the pointer moved back,
to a version whose files B's GC had deleted as half-written) and set Redis's
snapshot watermark back. Now A stops at its next write, says so, and B's
snapshot stays published and whole.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pupyl_queue import PupylQueue, Settings, integrity
from pupyl_queue import constants as C
from pupyl_queue.codecs import encode_segment
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelSpec, normalize
from pupyl_queue.searcher import Searcher
from pupyl_queue.store import LocalStore, open_store
from tests.workers import Workers

pytestmark = pytest.mark.slow
DB = 12
LOCK_S = 3
DIM = 128


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[tuple[PupylQueue, Workers]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + f"/{DB}",
        compact_lock_s=LOCK_S,
        flat_below=10_000_000,  # exact: the same index type for both runs, no training time
    )
    client = PupylQueue(settings=settings)
    client.redis.flushdb()
    spec = ModelSpec("characteristic", DIM, 224, characteristic=1)
    client.redis.set(Layout().key("model"), json.dumps(spec.to_json(), sort_keys=True))
    workers = Workers(settings, tmp_path)
    try:
        yield client, workers
    finally:
        for proc in workers.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        client.close()
        workers.stop_all()
        client.redis.flushdb()


def inject(client: PupylQueue, name: str, batches: int, rows: int) -> int:
    """Vectors committed exactly as the embed stage commits them; returns the last sequence number."""
    coord, store, layout = Coordinator(client.redis, Layout()), open_store(client.settings), Layout()
    rng = np.random.default_rng(len(name) + batches)
    for b in range(batches):
        ids = coord.allocate_ids(f"{name}-{b}", rows)
        key = layout.segment(f"{name}-{b:04d}")
        data = encode_segment(np.array(ids), normalize(rng.normal(size=(rows, DIM)).astype(np.float32)))
        store.put(key, data)
        integrity.record_checksum(coord, key, data)
        coord.publish(key, images=rows)
    return coord.last_sequence()


def wait_for(what: str, ready: object, workers: Workers, timeout: float = 120, poll: float = 0.05) -> None:
    """Poll ``ready()``; a fine ``poll`` only where a race is caught (it costs the workers CPU)."""
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}\n{workers.logs()}"
        time.sleep(poll)


def test_a_stalled_compaction_cannot_publish_over_the_one_that_took_its_lock(
    cluster: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    client, workers = cluster
    store = open_store(client.settings)
    assert isinstance(store, LocalStore)
    layout = Layout()
    coord = Coordinator(client.redis, layout)
    root = store.root.joinpath(*layout.root.split("/"))
    workers.start(C.QUEUE_MAINTENANCE)
    a = workers.procs[C.QUEUE_MAINTENANCE]
    inject(client, "first", 1, 100)
    assert "skipped" not in client.compact(timeout=120)

    a_target = inject(client, "bulk", 60, 2000)  # 120k vectors: A's snapshot takes a while to write
    first = client.app.send_task(C.TASK_COMPACT, kwargs={"collection": layout.collection})
    a_folder = root / C.STORE_SNAPSHOTS / f"{a_target:016d}"
    a_vectors = root / C.STORE_VECTORS / f"{a_target:016d}-00000.npz"
    wait_for(
        "A never wrote its new version", lambda: a_vectors.exists() or a_folder.exists(), workers, poll=0.0005
    )
    os.kill(a.pid, signal.SIGSTOP)  # A stalls mid-write, longer than its lock
    assert not (a_folder / "manifest.json").exists(), "A finished before the stall: nothing tested"
    workers.start_extra(C.QUEUE_MAINTENANCE)
    lock = layout.key("compact-lock")
    wait_for("the lock never lapsed", lambda: not client.redis.exists(lock), workers, LOCK_S + 10)

    b_target = inject(client, "later", 1, 100)
    second = client.compact(timeout=120)  # worker B: A is frozen, and solo, with its one task
    assert second["watermark"] == b_target > a_target and "skipped" not in second
    published = json.loads(store.get(layout.snapshot_pointer))
    os.kill(a.pid, signal.SIGCONT)
    log = tmp_path / f"{C.QUEUE_MAINTENANCE}.log"
    done = re.compile(rf"Task {re.escape(C.TASK_COMPACT)}\[{first.id}\] (succeeded|raised)")
    wait_for("A never ended its run", lambda: done.search(log.read_text(errors="replace")), workers)

    # B's snapshot is still the published one, whole, and Redis's watermark did not go back.
    assert json.loads(store.get(layout.snapshot_pointer)) == published
    assert published["path"] == layout.snapshot(b_target)
    assert coord.snapshot_watermark() == b_target
    manifest = integrity.open_manifest(store, published["path"])
    for name in manifest["files"]:
        integrity.snapshot_file(store, manifest, name)
    for key in manifest["vector_files"]:
        integrity.read_checked(store, key, manifest["vector_sha256"][key])
    reader = Searcher(store, coord, layout)
    reader.load()
    assert reader.health() == {} and len(reader) == 100 + 120_000 + 100
    # A said why it stopped, and published nothing.
    assert "lost the compaction lock" in first.get(timeout=30)["skipped"]
    assert "stopped, nothing published" in log.read_text(errors="replace")
    assert not (a_folder / "manifest.json").exists()
    workers.check_alive()
