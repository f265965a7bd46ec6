"""The FAISS wrapper against brute force on small synthetic data."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pupyl_queue import constants as C
from pupyl_queue.gpu_index import cpu_ivf
from pupyl_queue.models import normalize
from pupyl_queue.vector_index import IdSet, VectorIndex, choose_factory, code_bytes, two_level_centroids


def data(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.choice(10**6, n, replace=False).astype(np.int64) + 1, normalize(rng.normal(size=(n, dim)))


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    return normalize(centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, dim)))


def brute(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, top: int) -> list[int]:
    sims = vectors @ query
    return [int(ids[i]) for i in np.argsort(-sims)[:top]]


def test_matches_brute_force_with_explicit_ids() -> None:
    ids, vectors = data()
    index = VectorIndex(16)
    assert index.add(ids, vectors) == 200
    for q in range(5):
        hits = index.search(vectors[q], 10)[0]
        assert [i for i, _ in hits] == brute(ids, vectors, vectors[q], 10)
        assert hits[0] == (int(ids[q]), pytest.approx(0.0, abs=1e-5))
        dists = [d for _, d in hits]
        assert dists == sorted(dists)


def test_adding_twice_is_harmless_and_removal_is_filtered_at_once() -> None:
    ids, vectors = data()
    index = VectorIndex(16)
    index.add(ids, vectors)
    assert index.add(ids[:10], vectors[:10]) == 0
    assert len(index) == 200
    # remove the 10 nearest neighbours of a query: the next 10 still come back, none removed
    nearest = brute(ids, vectors, vectors[0], 10)
    assert index.remove(nearest + [12345678]) == 10
    assert len(index) == 190 and nearest[0] not in index
    hits = [i for i, _ in index.search(vectors[0], 10)[0]]
    keep = ~np.isin(ids, nearest)
    assert hits == brute(ids[keep], vectors[keep], vectors[0], 10)


def test_serialize_round_trip() -> None:
    ids, vectors = data()
    index = VectorIndex(16)
    index.add(ids, vectors)
    again = VectorIndex.deserialize(
        index.serialize(), 16, ids=IdSet.from_bytes(index.ids.to_bytes(), index.ids.size)
    )
    assert len(again) == 200
    assert again.search(vectors[7], 8) == index.search(vectors[7], 8)
    np.testing.assert_allclose(again.vector(int(ids[7])), vectors[7], atol=1e-6)
    with pytest.raises(ValueError, match="16-d"):
        VectorIndex.deserialize(index.serialize(), 32)


def exact_and_ivf(
    factory: str, n: int, nprobe: int, two_level: bool | None = None
) -> tuple[np.ndarray, np.ndarray, VectorIndex, VectorIndex]:
    """ids, vectors, and both an exact index and a trained ``factory`` index holding them."""
    vectors = clustered(n)
    ids = np.arange(1, n + 1)
    exact, ivf = VectorIndex(32), VectorIndex(32, factory, nprobe=nprobe)
    ivf.train(vectors, two_level=two_level)
    exact.add(ids, vectors)
    ivf.add(ids, vectors)
    return ids, vectors, exact, ivf


def test_ivf_recall_against_exact() -> None:
    ids, vectors, exact, ivf = exact_and_ivf("IVF64,SQ8", 6000, nprobe=16)
    queries = clustered(50, seed=1)
    recall = np.mean(
        [
            len({i for i, _ in a} & {i for i, _ in b}) / 10
            for a, b in zip(exact.search(queries, 10), ivf.search(queries, 10))
        ]
    )
    assert recall >= 0.9
    ivf.remove([int(ids[0])])
    assert int(ids[0]) not in [i for i, _ in ivf.search(vectors[0], 5)[0]]
    np.testing.assert_allclose(ivf.vector(5), vectors[4], atol=0.05)  # SQ8 codes are close


def test_pq_codes_train_without_the_polysemous_step_and_find_the_same() -> None:
    """index_factory turns polysemous training on for IVF-PQ (for a Hamming pre-filter no search
    here uses); it took most of a PQ training (86-90%, bench/pq_training.py). Off, the answers are
    those of the index trained with it: the same centroids, only ordered differently."""
    vectors = clustered(3000)
    ids = np.arange(1, 3001)
    ours = VectorIndex(32, "IVF16,PQ8x4", nprobe=4)
    assert not cpu_ivf(ours._index).do_polysemous_training
    default = faiss.index_factory(32, "IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    assert cpu_ivf(default).do_polysemous_training  # what it would be without build's switch
    twin = VectorIndex(32, "IVF16,PQ8x4", index=default, nprobe=4)
    for index in (ours, twin):
        index.train(vectors)
        index.add(ids, vectors)
    assert cpu_ivf(twin._index).polysemous_ht == 0  # the Hamming pre-filter stays off either way
    queries = clustered(50, seed=1)
    assert ours.search(queries, 10) == twin.search(queries, 10)


def test_empty_and_small() -> None:
    index = VectorIndex(4)
    assert index.search(np.ones(4, dtype=np.float32), 3) == [[]]
    index.add(np.array([7]), normalize(np.ones((1, 4))))
    assert [i for i, _ in index.search(np.ones(4, dtype=np.float32), 3)[0]] == [7]
    with pytest.raises(ValueError, match="expected 4-d"):
        index.add(np.array([8]), np.ones((1, 5), dtype=np.float32))


def test_index_type_follows_size_and_memory() -> None:
    gib = 1024**3
    assert choose_factory(50_000, 1024, 12 * gib, flat_below=100_000) == "Flat"
    assert choose_factory(1_000_000, 1024, 12 * gib, flat_below=100_000) == "IVF4096,SQ8"
    assert choose_factory(200_000, 256, 12 * gib, flat_below=100_000) == "IVF2048,SQ8"
    # 10M 1024-d: the finest codes that fit, with an HNSW coarse quantizer over 16k lists
    assert choose_factory(10_000_000, 1024, 12 * gib, flat_below=100_000) == "IVF16384_HNSW32,SQ8"
    assert choose_factory(10_000_000, 1024, 10 * gib, flat_below=100_000) == "IVF16384_HNSW32,SQ6"
    assert choose_factory(10_000_000, 1024, 8 * gib, flat_below=100_000) == "IVF16384_HNSW32,SQ4"
    assert choose_factory(10_000_000, 1024, 2 * gib, flat_below=100_000) == "IVF16384_HNSW32,PQ64"
    for factory, size in [("Flat", 4096), ("IVF64,SQ8", 1024), ("IVF64,SQ6", 768), ("IVF64,SQ4", 512)]:
        assert code_bytes(factory, 1024) == size
    assert code_bytes("IVF16384_HNSW32,PQ64", 1024) == 64


@pytest.mark.parametrize("factory", ["IVF64,SQ6", "IVF64_HNSW32,SQ4", "IVF64_HNSW32,SQ8"])
def test_two_level_training_and_file_round_trip(factory: str, tmp_path) -> None:  # noqa: ANN001
    """The large-index path on a small one: two-level k-means, HNSW lists, codes, written and read back."""
    _, _, exact, ivf = exact_and_ivf(factory, 6000, nprobe=16, two_level=True)
    queries = clustered(50, seed=1)
    found = ivf.search(queries, 10)
    recall = np.mean(
        [len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in zip(exact.search(queries, 10), found)]
    )
    assert recall >= 0.8, (factory, recall)
    ivf.write(tmp_path / "index.faiss")
    again = VectorIndex.read(tmp_path / "index.faiss", 32, factory, ivf.ids, nprobe=16)
    assert again.search(queries, 10) == found
    assert again.memory_bytes() == 6000 * (code_bytes(factory, 32) + 8) + ivf.ids.nbytes


def test_hnsw_coarse_quantizer_searches_as_wide_as_nprobe(tmp_path) -> None:  # noqa: ANN001
    """FAISS's HNSW search is as wide as efSearch, not k: left at 16, most of nprobe=256 lists were
    guesses. Exact over every list, the IVF must find what exact search finds."""
    _, _, exact, ivf = exact_and_ivf("IVF256_HNSW32,Flat", 8000, nprobe=256)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(ivf._index).quantizer)
    assert quantizer.hnsw.efSearch == 512  # restored after add, which searched it 16 wide
    queries = clustered(50, seed=1)
    assert [[i for i, _ in row] for row in ivf.search(queries, 10)] == [
        [i for i, _ in row] for row in exact.search(queries, 10)
    ]
    ivf.write(tmp_path / "index.faiss")  # and again after a reload: the setting is not in the file
    again = VectorIndex.read(tmp_path / "index.faiss", 32, "IVF256_HNSW32,Flat", ivf.ids, nprobe=128)
    assert faiss.downcast_index(faiss.extract_index_ivf(again._index).quantizer).hnsw.efSearch == 256


def test_two_level_centroids_cover_every_list_even_when_clusters_are_uneven() -> None:
    rng = np.random.default_rng(3)
    # one big blob and a few stray points: a naive split would ask a tiny cluster for no centroid or too many
    sample = normalize(np.concatenate([rng.normal(size=(3000, 8)) + 5, rng.normal(size=(12, 8)) * 9]))
    centroids = two_level_centroids(sample.astype(np.float32), 256)
    assert centroids.shape == (256, 8)
    assert np.isfinite(centroids).all()


def test_id_set() -> None:
    s = IdSet()
    s.add(np.array([3, 5, 5000]))
    assert len(s) == 3 and s.contains(np.array([3, 4, 5000, -1, 10**7])).tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert s.discard(np.array([5, 6])) == 1 and len(s) == 2
    again = IdSet.from_bytes(s.to_bytes(), s.size)
    assert again.contains(np.array([3, 5, 5000])).tolist() == [True, False, True]


def test_memory_bytes_counts_the_id_bitmap_as_the_bytes_it_holds() -> None:
    """The bitmap is a bool array, a byte per id slot: counted as bits, memory_bytes was 8x low for it
    (ids come from a counter shared by every collection, so a small index may hold a high id)."""
    index = VectorIndex(4)
    index.add(np.array([8_000_000]), np.ones((1, 4), dtype=np.float32))
    slots = index.ids.size
    assert slots > 8_000_000
    assert index.memory_bytes() == 1 * (4 * 4 + 8) + slots  # one byte per slot, as numpy stores bools


def test_a_few_queries_search_on_one_faiss_thread_and_leave_the_setting_as_it_was() -> None:
    import threading

    from pupyl_queue import vector_index

    seen: list[int] = []
    ids, vectors = data()
    index = VectorIndex(16)
    index.add(ids, vectors)
    real = type(index._index).search  # the FAISS class's search, wrapped to see the thread count

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(faiss.omp_get_max_threads())
        return real(self, *args, **kwargs)

    before = faiss.omp_get_max_threads()
    type(index._index).search = spy
    try:
        few = index.search(vectors[:2], 3)
        many = index.search(vectors[: C.FAISS_PARALLEL_MIN_QUERIES], 3)
    finally:
        type(index._index).search = real
    assert seen == [1, before] and faiss.omp_get_max_threads() == before
    assert [row[0][0] for row in few] == [int(i) for i in ids[:2]]
    assert [row[0][0] for row in many] == [int(i) for i in ids[: C.FAISS_PARALLEL_MIN_QUERIES]]
    # OpenMP keeps the setting per thread: another thread's searches are not narrowed meanwhile.
    other: list[int] = []
    with vector_index._faiss_threads(1):  # one query
        thread = threading.Thread(target=lambda: other.append(faiss.omp_get_max_threads()))
        thread.start()
        thread.join()
    assert other == [before]
