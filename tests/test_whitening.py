"""PCA whitening as a collection property (issue #18): recorded in the manifest, learned at compaction,
applied by the searcher to the snapshot, the commits after it and every query.

Real Redis (the session's redis-server) and a real local store; no workers (through real workers:
tests/test_copies.py, test_workers_whiten_a_collection_with_the_option). Every ranking is checked
against a numpy reference written apart from pupyl_queue/whitening.py (an SVD, not an eigh).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.backup import backup, restore
from pupyl_queue.catalog import describe_collection
from pupyl_queue.codecs import ROWS_FILE, decode_segment_rows, encode_segment
from pupyl_queue.collection import ensure_collection
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelMismatchError, ModelSpec, normalize
from pupyl_queue.queries import compact, nearest, nearest_request
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings, SettingsError
from pupyl_queue.store import LocalStore
from pupyl_queue.whitening import Whitening, check_whitening, learn, minimum_vectors, strength_of

DIM = 8
SCALES = np.array([6.0, 4.0, 2.5, 1.5, 1.0, 0.6, 0.3, 0.1])  # dominant directions, as CNN features have


def vectors_like_features(n: int, seed: int) -> np.ndarray:
    """Unit vectors whose spread is uneven across directions, around a common offset."""
    rng = np.random.default_rng(seed)
    return normalize(rng.normal(size=(n, DIM)) * SCALES + 3.0)


def reference(x: np.ndarray, s: float = 0.5):  # type: ignore[no-untyped-def]
    """PCA whitening by hand: SVD of the centred vectors, eigenvalues^(-s/2), unit length."""
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    _, singular, directions = np.linalg.svd(x - mean, full_matrices=False)
    eigen = singular**2 / (len(x) - 1)
    eigen = np.maximum(eigen, eigen.max() * C.WHITENING_EIGEN_FLOOR)

    def apply(v: np.ndarray) -> np.ndarray:
        y = ((np.asarray(v, np.float64) - mean) @ directions.T) * eigen ** (-s / 2)
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    return apply


def ranking(stored: np.ndarray, ids: np.ndarray, query: np.ndarray, top: int) -> list[tuple[int, float]]:
    sims = stored @ query
    order = np.argsort(-sims, kind="stable")[:top]
    return [(int(ids[j]), float(1 - sims[j])) for j in order]


def assert_same_hits(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want], (got, want)
    np.testing.assert_allclose([d for _, d in got], [d for _, d in want], atol=2e-5)


# --- the option --------------------------------------------------------------------------------


def test_the_option_is_recorded_with_the_model_and_an_old_manifest_reads_as_none() -> None:
    assert [check_whitening(v) for v in ("none", "", "PCA", "pca:0.5", "pca:0.25", "pca:1")] == [
        "none",
        "none",
        "pca",
        "pca",
        "pca:0.25",
        "pca:1",
    ]
    assert [strength_of(v) for v in ("none", "pca", "pca:0.25")] == [None, 0.5, 0.25]
    for bad in ("zca", "pca:0", "pca:1.5", "pca:x", "pca:-1"):
        with pytest.raises(ValueError, match="whitening must be none, pca"):
            check_whitening(bad)
    plain = ModelSpec("keras", 256, 224, sha256="ab" * 32)
    assert plain.whitening == "none" and "whitening" not in plain.to_json()  # manifests as before
    old = {"kind": "keras", "dim": 256, "input_size": 224, "characteristic": 0, "sha256": "ab" * 32}
    assert ModelSpec.from_json(old) == plain
    pca = plain.with_whitening("pca:0.5")
    assert pca.whitening == "pca" and pca.to_json()["whitening"] == "pca"
    assert ModelSpec.from_json(pca.to_json()) == pca and pca != plain and "pca whitening" in pca.label
    assert repr(pca) == repr(plain)  # int8.source_hash hashes the repr: int8 models keep their key
    assert Settings(whitening="pca:0.25").whitening == "pca:0.25" and Settings().whitening == "none"
    with pytest.raises(SettingsError, match="PUPYL_WHITENING"):
        Settings(whitening="full")


def test_ensure_collection_fixes_the_whitening_at_creation(tmp_path: Path, redis_client: redis.Redis) -> None:
    store, layout = LocalStore(tmp_path), Layout("white")
    made = ensure_collection(store, redis_client, layout, {"characteristic": 1, "default_whitening": "pca"})
    assert made.whitening == "pca"
    manifest = json.loads(store.get(layout.manifest))
    assert manifest["model"]["whitening"] == "pca"
    # A later request with other defaults adopts the collection's; one that names another fails.
    assert ensure_collection(store, redis_client, layout, {"default_whitening": "none"}) == made
    assert ensure_collection(store, redis_client, layout, {"whitening": "pca:0.5"}) == made
    with pytest.raises(ModelMismatchError, match="pca whitening"):
        ensure_collection(store, redis_client, layout, {"whitening": "none"})
    plain = ensure_collection(store, redis_client, Layout("plain"), {"characteristic": 1})
    assert (
        plain.whitening == "none"
        and "whitening" not in json.loads(store.get(Layout("plain").manifest))["model"]
    )


# --- the transform -------------------------------------------------------------------------------


def test_learn_matches_a_numpy_reference_and_inverts() -> None:
    x = vectors_like_features(300, seed=1)
    queries = vectors_like_features(20, seed=2)
    whitening = learn(x, 0.5)
    assert whitening is not None and whitening.learned_from == 300 and whitening.dim == DIM
    assert whitening.mean.dtype == np.float32 and whitening.projection.dtype == np.float32
    ref = reference(x)
    # Directions have no sign or order of their own: compare what search uses, the cosines.
    np.testing.assert_allclose(
        whitening.apply(queries) @ whitening.apply(x).T, ref(queries) @ ref(x).T, atol=1e-5
    )
    raw_cosines = queries @ x.T
    assert np.abs(raw_cosines - ref(queries) @ ref(x).T).max() > 0.1  # whitening changes the ranking
    np.testing.assert_allclose(np.linalg.norm(whitening.apply(x), axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(whitening.invert(whitening.apply(x)), x, atol=2e-5)  # raw vectors back
    again = Whitening.from_bytes(whitening.to_bytes())
    np.testing.assert_array_equal(again.projection, whitening.projection)
    assert (again.strength, again.learned_from) == (0.5, 300)
    full = learn(x, 1.0)
    assert full is not None and not np.allclose(full.apply(queries), whitening.apply(queries))
    with pytest.raises(ValueError, match="not a whitening file"):
        Whitening.from_bytes(b"PK\x03\x04 not a zip")
    assert learn(np.repeat(x[:1], 10, axis=0)) is None  # no spread: nothing to learn
    assert minimum_vectors(DIM) == C.WHITENING_MIN_VECTORS and minimum_vectors(1024) == 2048


# --- compaction and search -----------------------------------------------------------------------


@pytest.fixture
def rt(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))


def create(rt: Runtime, whitening: str, collection: str = "default") -> None:
    """A collection of DIM-d vectors, made as ensure_collection makes one (manifest and Redis claim)."""
    layout = Layout(collection)
    spec = ModelSpec("keras", DIM, 224, sha256="ab" * 32, whitening=whitening)
    rt.store.put(
        layout.manifest,
        json.dumps(
            {"schema": 1, "collection": collection, "model": spec.to_json(), "created_at": 0}
        ).encode(),
    )
    rt.redis.set(layout.key("model"), json.dumps(spec.to_json(), sort_keys=True))


def commit(rt: Runtime, name: str, vectors: np.ndarray, collection: str = "default") -> np.ndarray:
    """Vectors committed as the embed stage commits them; returns their ids."""
    coord, layout = rt.coordinator(collection), Layout(collection)
    ids = np.array(coord.allocate_ids(name, len(vectors)), dtype=np.int64)
    data = encode_segment(ids, vectors)
    rt.store.put(layout.segment(name), data)
    integrity.record_checksum(coord, layout.segment(name), data)
    coord.publish(layout.segment(name), images=len(ids))
    return ids


def tombstone(rt: Runtime, image_id: int) -> None:
    layout, coord = Layout(), rt.coordinator("default")
    rt.store.put(layout.tombstone(image_id), json.dumps({"id": image_id}).encode())
    coord.publish(layout.tombstone(image_id))


def fresh(rt: Runtime, collection: str = "default", shard: tuple[int, int] | None = None) -> Searcher:
    searcher = Searcher(rt.store, rt.coordinator(collection), Layout(collection), shard=shard)
    searcher.load()
    return searcher


def test_compaction_learns_the_whitening_from_the_live_vectors_and_records_it(rt: Runtime) -> None:
    create(rt, "pca")
    first, second = vectors_like_features(60, seed=3), vectors_like_features(60, seed=4)
    ids = np.concatenate([commit(rt, "a", first), commit(rt, "b", second)])
    tombstone(rt, int(ids[5]))
    manifest = compact(rt, {"collection": "default"})
    assert manifest["whitening"] == {
        "kind": "pca",
        "strength": 0.5,
        "learned_from": 119,
        "file": "whitening.npz",
    }
    data = rt.store.get(f"{manifest['path']}/{C.SNAPSHOT_WHITENING}")
    assert manifest["files"][C.SNAPSHOT_WHITENING] == integrity.sha256(data)  # checked like every file
    assert manifest["sizes"][C.SNAPSHOT_WHITENING] == len(data)
    live = np.delete(np.concatenate([first, second]), 5, axis=0)
    learned = Whitening.from_bytes(data)
    np.testing.assert_allclose(learned.mean, live.mean(axis=0), atol=1e-6)
    ref = reference(live)
    np.testing.assert_allclose(
        learned.apply(live) @ learned.apply(live).T, ref(live) @ ref(live).T, atol=1e-5
    )
    # Stored vectors never change: the snapshot's vector files hold the network's vectors.
    stored_ids, stored, _ = decode_segment_rows(rt.store.get(manifest["vector_files"][0]))
    by_id = dict(zip(np.delete(ids, 5).tolist(), live))
    np.testing.assert_array_equal(stored, np.stack([by_id[i] for i in stored_ids.tolist()]))
    described = describe_collection(rt.store, rt.redis, "default")
    assert described["whitening"] == "pca" and described["last_snapshot"]["whitening"]["learned_from"] == 119


def test_search_after_compaction_ranks_whitened_vectors(rt: Runtime) -> None:
    create(rt, "pca")
    base = vectors_like_features(150, seed=5)
    ids = commit(rt, "a", base)
    live_before = fresh(rt)  # loaded before any snapshot: it swaps the whitened one in
    manifest = compact(rt, {"collection": "default"})
    tail = vectors_like_features(12, seed=6)  # committed after the snapshot: whitened by its transform
    tail_ids = commit(rt, "b", tail)
    ref = reference(base)  # learned from what the snapshot held, not from the tail
    all_ids, raw = np.concatenate([ids, tail_ids]), np.concatenate([base, tail])
    searcher = fresh(rt)
    assert searcher.index is not None and searcher.index.whitening is not None
    queries = vectors_like_features(15, seed=7)
    differs = 0
    for query in queries:
        want = ranking(ref(raw), all_ids, ref(query[None])[0], 10)
        assert_same_hits(searcher.search(query, 10), want)
        differs += [i for i, _ in want] != [i for i, _ in ranking(raw, all_ids, query, 10)]
    assert differs >= 5  # the raw ranking is another one: the test can tell them apart
    deadline = time.monotonic() + 10
    while live_before.snapshot_watermark != manifest["watermark"] and time.monotonic() < deadline:
        live_before.refresh(force=True)
        time.sleep(0.05)
    assert_same_hits(live_before.search(queries[0], 10), searcher.search(queries[0], 10))
    # A stored vector comes back raw (search by id, set_attributes), for snapshot and tail rows alike.
    np.testing.assert_allclose(searcher.vector(int(ids[3])), base[3], atol=2e-5)
    np.testing.assert_allclose(searcher.vector(int(tail_ids[2])), tail[2], atol=2e-5)
    # Raw distances (the vector near-duplicate check): the whitened few, re-scored by raw cosine.
    for query in queries[:5]:
        (hit,) = searcher.search_many(query[None], 1, raw_distances=True)[0]
        shortlist = [i for i, _ in ranking(ref(raw), all_ids, ref(query[None])[0], C.WHITENING_RESCORE)]
        rows = np.isin(all_ids, shortlist)
        assert_same_hits([hit], ranking(raw[rows], all_ids[rows], query, 1))


def test_nearest_reports_raw_cosine_and_copy_short_lists_stay_whitened(rt: Runtime) -> None:
    create(rt, "pca")
    base = vectors_like_features(100, seed=8)
    ids = commit(rt, "a", base)
    compact(rt, {"collection": "default"})
    ref = reference(base)
    query = normalize(base[10:11] + 0.05 * np.random.default_rng(9).normal(size=(1, DIM)))
    answer = nearest(rt, nearest_request("default", query))
    image_id, distance = answer["nearest"][0]
    assert image_id == ids[10] and abs(distance - (1 - float(base[10] @ query[0]))) < 2e-5
    assert abs(distance - ranking(ref(base), ids, ref(query)[0], 1)[0][1]) > 1e-4  # not the whitened one
    candidates = nearest(rt, nearest_request("default", query, top=5))["candidates"][0]
    assert_same_hits([(i, d) for i, d in candidates], ranking(ref(base), ids, ref(query)[0], 5))


def test_a_collection_without_the_option_is_unchanged(rt: Runtime) -> None:
    create(rt, "none")
    base = vectors_like_features(150, seed=10)
    ids = commit(rt, "a", base)
    manifest = compact(rt, {"collection": "default"})
    assert "whitening" not in manifest and "whitening_pending" not in manifest
    assert set(manifest["files"]) == {"ids.bits", "tombstones.npy", ROWS_FILE, "index.faiss"}
    searcher = fresh(rt)
    assert searcher.index is not None and searcher.index.whitening is None
    for query in vectors_like_features(5, seed=11):
        assert_same_hits(searcher.search(query, 10), ranking(base, ids, query, 10))
        assert searcher.search_many(query[None], 1, raw_distances=True)[0] == searcher.search(query, 1)


def test_too_few_vectors_wait_for_a_later_compaction(rt: Runtime) -> None:
    create(rt, "pca")
    few = vectors_like_features(40, seed=12)
    ids = commit(rt, "a", few)
    manifest = compact(rt, {"collection": "default"})
    assert manifest["whitening"] is None and "40 live vectors, 64 needed" in manifest["whitening_pending"]
    assert C.SNAPSHOT_WHITENING not in manifest["files"]
    query = vectors_like_features(1, seed=13)[0]
    assert_same_hits(fresh(rt).search(query, 5), ranking(few, ids, query, 5))  # searched as it is
    more = vectors_like_features(40, seed=14)
    all_ids = np.concatenate([ids, commit(rt, "b", more)])
    assert compact(rt, {"collection": "default"})["whitening"]["learned_from"] == 80
    raw = np.concatenate([few, more])
    ref = reference(raw)
    assert_same_hits(fresh(rt).search(query, 5), ranking(ref(raw), all_ids, ref(query[None])[0], 5))


def test_shards_whiten_with_the_whole_collection_transform(rt: Runtime) -> None:
    create(rt, "pca")
    base = vectors_like_features(200, seed=15)
    commit(rt, "a", base)
    compact(rt, {"collection": "default"})
    commit(rt, "b", vectors_like_features(10, seed=16))
    whole = fresh(rt)
    shards = [fresh(rt, shard=(k, 2)) for k in range(2)]
    for query in vectors_like_features(5, seed=17):
        merged = sorted((hit for s in shards for hit in s.search(query, 10)), key=lambda h: h[1])[:10]
        assert_same_hits(merged, whole.search(query, 10))


def test_backup_and_restore_carry_the_transform(rt: Runtime, tmp_path: Path) -> None:
    create(rt, "pca")
    base = vectors_like_features(120, seed=18)
    commit(rt, "a", base)
    compact(rt, {"collection": "default"})
    commit(rt, "b", vectors_like_features(5, seed=19))
    archive = tmp_path / "backup.tar"
    backup(rt.store, rt.redis, "default", str(archive), rt.settings)
    restore(str(archive), rt.store, rt.redis, rt.settings, as_name="copy")
    original, restored = fresh(rt), fresh(rt, "copy")
    assert restored.index is not None and restored.index.whitening is not None
    assert rt.spec("copy").whitening == "pca"
    for query in vectors_like_features(5, seed=20):
        assert_same_hits(restored.search(query, 10), original.search(query, 10))


def test_a_damaged_whitening_file_is_reported(rt: Runtime) -> None:
    create(rt, "pca")
    commit(rt, "a", vectors_like_features(100, seed=21))
    manifest = compact(rt, {"collection": "default"})
    key = f"{manifest['path']}/{C.SNAPSHOT_WHITENING}"
    rt.store.put(key, rt.store.get(key)[:-7] + b"garbage")
    searcher = fresh(rt)  # the snapshot is passed over: the whole log is replayed (still complete)
    assert key in searcher.damaged and len(searcher) == 100
    assert key in integrity.damaged_keys(rt.coordinator("default"))
