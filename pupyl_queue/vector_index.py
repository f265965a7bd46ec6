"""FAISS index with explicit, stable int64 ids.

Exact inner product on L2-normalised vectors (``IndexIDMap2`` over
``IndexFlatIP``). Distances are reported as cosine distance, ``1 - cosine``:
0 for the same image, up to 2 for opposite vectors; smaller is closer.
"""

from __future__ import annotations

import faiss
import numpy as np


class VectorIndex:
    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: set[int] = set(int(i) for i in faiss.vector_to_array(self._index.id_map))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add vectors whose ids are not present yet (applying a segment twice is harmless)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d vectors, got shape {vectors.shape}")
        fresh = np.array([int(i) not in self._ids for i in ids], dtype=bool)
        if not fresh.any():
            return 0
        self._index.add_with_ids(vectors[fresh], ids[fresh])
        self._ids.update(int(i) for i in ids[fresh])
        return int(fresh.sum())

    def remove(self, ids: list[int]) -> int:
        present = [i for i in ids if i in self._ids]
        if not present:
            return 0
        removed = int(self._index.remove_ids(np.asarray(present, dtype=np.int64)))
        self._ids.difference_update(present)
        return removed

    def search(self, queries: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
        """For each query, up to ``top`` (id, cosine distance) pairs, nearest first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(top, len(self))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        sims, ids = self._index.search(queries, k)
        return [
            [(int(i), float(max(0.0, 1.0 - s))) for i, s in zip(row_ids, row_sims) if i >= 0]
            for row_ids, row_sims in zip(ids, sims)
        ]

    def vector(self, image_id: int) -> np.ndarray:
        if image_id not in self._ids:
            raise KeyError(image_id)
        return self._index.reconstruct(int(image_id))

    def serialize(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def deserialize(cls, data: bytes, dim: int) -> VectorIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"snapshot index is {index.d}-d, its manifest says {dim}-d")
        return cls(dim, index)
