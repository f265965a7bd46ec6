"""Compaction's vector files: big clean inputs referenced, not copied; GC keeps what a snapshot lists.

Real Redis and a real local store, no workers. Segments of REUSE_ROWS vectors are
cheap at 8 dimensions, so the reuse rule runs as in production.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue.codecs import decode_segment, encode_segment
from pupyl_queue.compaction import REUSE_ROWS, Compactor
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings
from pupyl_queue.store import LocalStore, ObjectStore
from tests.test_store_damage import DIM, answers, commit_segment, commit_tombstone, compact, damage, fresh
from workers.signals import over_bound

BIG = REUSE_ROWS


@pytest.fixture
def parts(redis_client: redis.Redis, tmp_path: Path) -> tuple[ObjectStore, Coordinator, Layout]:
    layout = Layout()
    return LocalStore(tmp_path / "store"), Coordinator(redis_client, layout), layout


def stored(store: ObjectStore, layout: Layout, folder: str) -> set[str]:
    return set(store.list(f"{layout.root}/{folder}/"))


def listed_ids(store: ObjectStore, manifest: dict) -> list[int]:
    ids: list[int] = []
    for key in manifest["vector_files"]:
        ids += decode_segment(store.get(key))[0].tolist()
    return sorted(ids)


def test_big_clean_segments_are_referenced_small_and_removed_ones_rewritten(parts: tuple) -> None:
    store, coord, layout = parts
    commit_segment(parts, "big-clean", list(range(1, BIG + 1)), seed=1)
    commit_segment(parts, "big-hit", list(range(BIG + 1, 2 * BIG + 1)), seed=2)
    commit_segment(parts, "small", list(range(2 * BIG + 1, 2 * BIG + 51)), seed=3)
    commit_tombstone(parts, BIG + 7)
    before = answers(fresh(parts))  # replayed from the log: nothing compacted yet
    manifest = compact(parts)
    # The clean big segment is listed as it is; the other two went into one merged file.
    assert layout.segment("big-clean") in manifest["vector_files"]
    assert manifest["reused_vector_files"] == 1
    merged = [k for k in manifest["vector_files"] if f"/{C.STORE_VECTORS}/" in k]
    assert len(merged) == 1 and len(manifest["vector_files"]) == 2
    assert listed_ids(store, manifest) == [i for i in range(1, 2 * BIG + 51) if i != BIG + 7]
    assert manifest["vector_sha256"][layout.segment("big-clean")]
    assert answers(fresh(parts)) == before


def test_gc_keeps_referenced_segments_until_no_kept_snapshot_lists_them(parts: tuple) -> None:
    store, coord, layout = parts
    commit_segment(parts, "a", list(range(1, BIG + 1)), seed=1)
    commit_segment(parts, "b", list(range(BIG + 1, BIG + 21)), seed=2)
    first = compact(parts, keep=1)
    assert layout.segment("a") in first["vector_files"]
    # keep=1: the commit log was trimmed past "a", but the snapshot still reads it
    assert layout.segment("a") not in [key for _, key in coord.commits_after(0)]
    assert store.exists(layout.segment("a"))
    assert not store.exists(layout.segment("b"))  # merged into the snapshot's own file, then collected

    commit_segment(parts, "c", list(range(BIG + 21, BIG + 41)), seed=3)
    second = compact(parts, keep=1)
    assert layout.segment("a") in second["vector_files"]  # carried over, never copied
    assert store.exists(layout.segment("a"))
    # Every file a kept snapshot lists exists, and nothing else is left under vectors/ or segments/.
    listed = set(second["vector_files"])
    assert all(store.exists(key) for key in listed)
    assert stored(store, layout, C.STORE_VECTORS) | stored(store, layout, C.STORE_SEGMENTS) == listed
    assert listed_ids(store, second) == list(range(1, BIG + 41))

    commit_tombstone(parts, 5)  # "a" is no longer clean: the next snapshot rewrites it
    live = answers(fresh(parts))  # the second snapshot plus the tombstone from the log
    assert all(5 not in [i for i, _ in row] for row in live)
    third = compact(parts, keep=1)
    assert layout.segment("a") not in third["vector_files"]
    assert not store.exists(layout.segment("a"))  # its last snapshot went, and so did it
    assert 5 not in listed_ids(store, third) and len(listed_ids(store, third)) == BIG + 40 - 1
    assert stored(store, layout, C.STORE_VECTORS) | stored(store, layout, C.STORE_SEGMENTS) == set(
        third["vector_files"]
    )
    assert answers(fresh(parts)) == live


def test_gc_never_deletes_a_segment_the_log_still_replays(parts: tuple) -> None:
    """A dropped (damaged) snapshot listed a segment that the kept older snapshot replays from the log."""
    store, coord, layout = parts
    commit_segment(parts, "a", list(range(1, 21)), seed=1)
    first = compact(parts)
    commit_segment(parts, "big", list(range(21, BIG + 21)), seed=2)
    second = compact(parts)
    assert layout.segment("big") in second["vector_files"]
    damage(store, f"{second['path']}/index.faiss", "flip")
    assert fresh(parts).snapshot_watermark == first["watermark"]  # reports the second one damaged
    commit_tombstone(parts, 30)  # "big" is no longer clean: the next snapshot rewrites it
    commit_segment(parts, "c", list(range(BIG + 21, BIG + 41)), seed=3)
    third = compact(parts)  # built on the first (the second is damaged), which GC then drops
    assert layout.segment("big") not in third["vector_files"]
    assert not store.exists(f"{second['path']}/manifest.json")
    assert store.exists(layout.segment("big"))  # the first snapshot still needs it from the log
    expected = answers(fresh(parts))
    assert all(30 not in [i for i, _ in row] for row in expected)
    damage(store, f"{third['path']}/index.faiss", "flip")
    older = fresh(parts)
    assert older.snapshot_watermark == first["watermark"] and answers(older) == expected


def test_compaction_with_an_hnsw_coarse_quantizer_answers_like_the_log(parts: tuple) -> None:
    """The factory shape chosen from 8,192 lists (IVF<n>_HNSW32,<codes>), on a small collection."""
    store, coord, layout = parts
    for n in range(4):
        commit_segment(parts, f"s{n}", list(range(1 + n * 1000, 1001 + n * 1000)), seed=n)
    live = fresh(parts)
    manifest = Compactor(store, coord, Settings(index_factory="IVF32_HNSW32,SQ8", index_nprobe=32)).run(
        {"metric": "cosine", "dim": DIM}
    )
    assert manifest["factory"] == "IVF32_HNSW32,SQ8" and manifest["nprobe"] == 32
    snap = fresh(parts)
    assert snap.snapshot_watermark == manifest["watermark"]
    # every list visited: the same neighbours as the exact replay, up to SQ8 rounding of the distances
    pairs = list(zip(answers(snap), answers(live)))
    assert all(got[0][0] == want[0][0] for got, want in pairs)
    overlap = [len({i for i, _ in got[:10]} & {i for i, _ in want[:10]}) / 10 for got, want in pairs]
    assert min(overlap) >= 0.8, overlap


def test_a_search_workers_memory_bound_leaves_its_indexes_out(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """PUPYL_WORKER_MAX_RSS_MB bounds what a worker leaks, not the indexes PUPYL_SEARCH_MEMORY_GB allows:
    a search worker holding a 10 GB index would otherwise stop after every search."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url)
    runtime = Runtime(settings)
    layout = Layout()
    parts = (runtime.store, Coordinator(redis_client, layout), layout)
    vectors = np.random.default_rng(0).normal(size=(20_000, 256)).astype(np.float32)  # 20 MB, exact
    runtime.store.put(layout.segment("a"), encode_segment(np.arange(1, 20_001), vectors))
    parts[1].publish(layout.segment("a"))
    searcher = runtime.searcher(layout.collection)  # loads under the runtime's lock, as a task does
    held_mb = runtime.index_bytes() / 2**20
    assert runtime.index_bytes() == searcher.index.memory_bytes() and held_mb > 19
    resident = held_mb + 300  # the index plus 300 MiB of everything else
    assert over_bound(resident, 310)  # counted whole, the worker would stop
    assert not over_bound(resident - held_mb, 310)  # what the worker's signal handler checks


def test_backup_and_restore_carry_a_snapshot_that_references_segments(
    parts: tuple, redis_url: str, tmp_path: Path
) -> None:
    """A referenced segment belongs to its snapshot: the backup takes it, the copy answers the same."""
    import json

    from pupyl_queue.backup import backup, restore

    store, coord, layout = parts
    store.put(
        layout.manifest, json.dumps({"schema": 1, "collection": layout.collection, "model": {}}).encode()
    )
    commit_segment(parts, "big", list(range(1, BIG + 1)), seed=1)
    manifest = compact(parts, keep=1)
    assert layout.segment("big") in manifest["vector_files"]
    commit_segment(parts, "later", list(range(BIG + 1, BIG + 21)), seed=2)
    expected = answers(fresh(parts))
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url)
    archive = tmp_path / "backup.tar"
    backup(store, coord.r, layout.collection, str(archive), settings)
    target = LocalStore(tmp_path / "restored")
    restore(str(archive), target, coord.r, settings, as_name="copy")
    copy = Layout("copy")
    restored = Searcher(target, Coordinator(coord.r, copy), copy)
    restored.load()
    assert restored.snapshot_watermark == manifest["watermark"]
    assert answers(restored) == expected
