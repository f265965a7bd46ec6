"""The FAISS wrapper against brute force on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from pupyl_queue.models import normalize
from pupyl_queue.vector_index import VectorIndex


def data(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.choice(10**9, n, replace=False).astype(np.int64), normalize(rng.normal(size=(n, dim)))


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


def test_adding_twice_is_harmless_and_remove_is_by_id() -> None:
    ids, vectors = data()
    index = VectorIndex(16)
    index.add(ids, vectors)
    assert index.add(ids[:10], vectors[:10]) == 0
    assert len(index) == 200
    assert index.remove([int(ids[0]), 12345]) == 1
    assert int(ids[0]) not in index
    hits = index.search(vectors[0], 5)[0]
    assert int(ids[0]) not in [i for i, _ in hits]
    assert [i for i, _ in hits] == brute(ids[1:], vectors[1:], vectors[0], 5)


def test_serialize_round_trip() -> None:
    ids, vectors = data()
    index = VectorIndex(16)
    index.add(ids, vectors)
    index.remove([int(ids[3])])
    again = VectorIndex.deserialize(index.serialize(), 16)
    assert len(again) == 199 and int(ids[3]) not in again
    assert again.search(vectors[7], 8) == index.search(vectors[7], 8)
    np.testing.assert_allclose(again.vector(int(ids[7])), vectors[7], atol=1e-6)
    with pytest.raises(ValueError, match="16-d"):
        VectorIndex.deserialize(index.serialize(), 32)


def test_empty_and_small() -> None:
    index = VectorIndex(4)
    assert index.search(np.ones(4, dtype=np.float32), 3) == [[]]
    index.add(np.array([7]), normalize(np.ones((1, 4))))
    assert [i for i, _ in index.search(np.ones(4, dtype=np.float32), 3)[0]] == [7]
    with pytest.raises(ValueError, match="expected 4-d"):
        index.add(np.array([8]), np.ones((1, 5), dtype=np.float32))
