"""Filtered search (issue #17): the true top-k among the allowed ids, on exact and IVF indexes."""

from __future__ import annotations

import numpy as np
import pytest

from pupyl_queue.models import normalize
from pupyl_queue.vector_index import SCAN_MAX, VectorIndex


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    return normalize(centers[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32))


def exact_within(
    ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, allowed: set[int], top: int
) -> list[int]:
    keep = np.array([i in allowed for i in ids])
    sims = vectors[keep] @ query
    return [int(i) for i in ids[keep][np.argsort(-sims)[:top]]]


@pytest.mark.parametrize("way", ["cpu", "gpu"])
@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8"])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.3])
def test_filtered_search_is_the_top_k_of_the_subset(factory: str, fraction: float, way: str) -> None:
    """``way="gpu"`` runs the GPU path (no selectors: deeper plain searches kept to the allowed ids,
    then the host path for rows they leave incomplete) on this CPU index."""
    n, dim = 20_000, 32
    vectors = clustered(n, dim)
    ids = np.arange(1000, 1000 + n, dtype=np.int64) * 3  # sparse, large ids
    index = VectorIndex(dim, factory, nprobe=4)
    if not index.is_trained:
        index.train(vectors)
    index.add(ids, vectors)
    rng = np.random.default_rng(1)
    allowed = np.sort(rng.choice(ids, max(1, int(n * fraction)), replace=False))
    removed = allowed[::5].tolist()
    index.remove(removed)
    live = set(allowed.tolist()) - set(removed)
    queries = clustered(30, dim, seed=9)
    unfiltered = index.search(queries, 10)
    if way == "cpu":
        found = index.search_within(queries, 10, allowed)
    else:
        nprobe = index.nprobe
        found = index._search_within_gpu(queries, 10, allowed[index.ids.contains(allowed)])
        assert index.nprobe == nprobe  # widened for the search only
    hits = total = 0
    for query, row, plain in zip(queries, found, unfiltered):
        truth = exact_within(ids, vectors, query, live, 10)
        got = [i for i, _ in row]
        assert set(got) <= live and len(got) == min(10, len(live))  # never a short list
        assert [d for _, d in row] == sorted(d for _, d in row)
        hits, total = hits + len(set(got) & set(truth)), total + len(truth)
        if fraction < 0.3:
            assert set(got) != {i for i, _ in plain}  # a post-filter of the plain top 10 would miss
    recall = hits / total
    assert recall == 1.0 if factory == "Flat" else recall >= 0.9, recall
    assert (len(allowed) <= SCAN_MAX) == (fraction < 0.3)  # both ways are used: decode-and-scan, selector


def test_the_gpu_way_completes_rows_on_the_host_only_when_it_must() -> None:
    """Deeper plain searches answer a 30% filter alone; a 0.05% one needs the host path."""
    n, dim = 20_000, 32
    vectors = clustered(n, dim)
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = VectorIndex(dim, "Flat")
    index.add(ids, vectors)
    queries = clustered(5, dim, seed=3)
    wide = ids[::3]
    rows = index._search_then_filter(queries, 10, wide, 2048)
    assert all(row is not None and len(row) == 10 for row in rows)
    narrow = ids[::2000]  # 10 ids
    assert all(row is None for row in index._search_then_filter(queries, 10, narrow, 2048))
    assert all(len(row) == 10 for row in index._search_within_gpu(queries, 10, narrow))


def test_filtered_search_of_nothing() -> None:
    index = VectorIndex(8, "Flat")
    index.add(np.array([1, 2]), normalize(np.eye(8, dtype=np.float32)[:2]))
    assert index.search_within(np.eye(8, dtype=np.float32)[:1], 5, np.array([], np.int64)) == [[]]
    assert index.search_within(np.eye(8, dtype=np.float32)[:1], 5, np.array([7])) == [[]]
    assert [i for i, _ in index.search_within(np.eye(8, dtype=np.float32)[:1], 5, np.array([2]))[0]] == [2]


def test_a_widening_cap_limits_the_lists_a_filtered_search_visits() -> None:
    """widen_cap=1 keeps nprobe as it is (a filter matching 6% then misses much of its true top 10);
    no cap visits nprobe / fraction lists and finds nearly all of it."""
    n, dim = 20_000, 32
    vectors = clustered(n, dim)
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = VectorIndex(dim, "IVF64,Flat", nprobe=2)
    index.train(vectors)
    index.add(ids, vectors)
    allowed = ids[::16]  # 1,250 ids, 6%: past SCAN_MAX, so FAISS searches with a selector
    assert len(allowed) > SCAN_MAX
    queries = clustered(40, dim, seed=4)

    def recall(cap: int | None) -> float:
        found = index.search_within(queries, 10, allowed, widen_cap=cap)
        truth = [exact_within(ids, vectors, q, set(allowed.tolist()), 10) for q in queries]
        return float(np.mean([len({i for i, _ in f} & set(t)) / 10 for f, t in zip(found, truth)]))

    assert recall(None) >= 0.95
    assert recall(1) < recall(None) - 0.1
