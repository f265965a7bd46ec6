"""FAISS indexes with explicit, stable int64 ids, chosen by collection size.

Inner product on L2-normalised vectors; distances are reported as cosine
distance, ``1 - cosine``: 0 for the same image, smaller is closer.

Small collections use exact search (``IDMap2,Flat``). Past a size threshold,
compaction trains an IVF index: √N-scaled lists, and SQ8 codes when they fit
the memory budget, PQ codes when they do not. Removal is logical at once (an
id bitmap filters results; searches over-fetch to still return ``top``) and
physical at the next compaction (``remove_ids`` is a full pass on big indexes).
"""

from __future__ import annotations

import contextlib
import math

import faiss
import numpy as np


class IdSet:
    """Ids present in an index, as a growable bitmap: ids come from a counter, so they are dense."""

    def __init__(self, bits: np.ndarray | None = None) -> None:
        self._bits = bits if bits is not None else np.zeros(1024, dtype=bool)
        self._count = int(self._bits.sum())

    def __len__(self) -> int:
        return self._count

    def _grow(self, top: int) -> None:
        if top >= len(self._bits):
            bigger = np.zeros(max(top + 1, 2 * len(self._bits)), dtype=bool)
            bigger[: len(self._bits)] = self._bits
            self._bits = bigger

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self._bits))
        out = np.zeros(len(ids), dtype=bool)
        out[inside] = self._bits[ids[inside]]
        return out

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self._grow(int(ids.max()))
            self._count += int((~self._bits[ids]).sum())
            self._bits[ids] = True

    def discard(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        hit = ids[self.contains(ids)]
        self._bits[hit] = False
        self._count -= len(np.unique(hit))
        return len(hit)

    def to_bytes(self) -> bytes:
        return np.packbits(self._bits).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> IdSet:
        return cls(np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:size].astype(bool))

    @property
    def size(self) -> int:
        return len(self._bits)


def choose_factory(n: int, dim: int, memory_bytes: int, flat_below: int) -> str:
    """The FAISS factory string for ``n`` vectors: exact below ``flat_below``, else IVF-SQ8 or IVF-PQ."""
    if n < flat_below:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(nlist, n // 39))  # FAISS wants >= 39 training points per list
    if n * dim * 1.2 <= memory_bytes:  # SQ8: one byte per dimension
        return f"IVF{nlist},SQ8"
    m = max(d for d in range(1, dim // 16 + 1) if dim % d == 0)  # 64 codes for 1024-d
    return f"IVF{nlist},PQ{m}"


def build(dim: int, factory: str) -> faiss.Index:
    if factory == "Flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


class VectorIndex:
    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        index: faiss.Index | None = None,
        ids: IdSet | None = None,
        nprobe: int = 32,
    ) -> None:
        self.dim = dim
        self.factory = factory
        self._index = index if index is not None else build(dim, factory)
        self.ids = ids if ids is not None else IdSet()
        self.removed_pending = 0  # removed logically, still inside the FAISS index
        self.set_nprobe(nprobe)
        if faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU
            self._index = faiss.index_cpu_to_all_gpus(self._index)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists an IVF search visits; 0 = auto: max(64, nlist/32), which kept recall@10 above .95
        on CNN-like vectors at 100k and 1M (BENCHMARKS.md)."""
        with contextlib.suppress(RuntimeError):  # not an IVF index
            ivf = faiss.extract_index_ivf(self._index)
            ivf.nprobe = min(ivf.nlist, nprobe if nprobe > 0 else max(64, ivf.nlist // 32))

    @property
    def nprobe(self) -> int | None:
        try:
            return int(faiss.extract_index_ivf(self._index).nprobe)
        except RuntimeError:
            return None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: int) -> bool:
        return bool(self.ids.contains(np.array([image_id]))[0])

    def memory_bytes(self) -> int:
        """About what the index holds in memory: codes and ids per vector, plus the id bitmap."""
        per_vector = {"Flat": self.dim * 4}.get(self.factory)
        if per_vector is None:
            codes = self.factory.split(",")[-1]
            per_vector = (
                int(codes[2:]) if codes.startswith("PQ") else self.dim if codes == "SQ8" else self.dim * 4
            )
        return int(self._index.ntotal) * (per_vector + 8) + self.ids.size // 8

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        self._index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add vectors whose ids are not present yet (applying a segment twice is harmless)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d vectors, got shape {vectors.shape}")
        fresh = ~self.ids.contains(ids)
        if not fresh.any():
            return 0
        self._index.add_with_ids(vectors[fresh], ids[fresh])
        self.ids.add(ids[fresh])
        return int(fresh.sum())

    def remove(self, ids: list[int]) -> int:
        """Logical removal: filtered from every result at once, dropped at the next compaction."""
        removed = self.ids.discard(np.asarray(ids, dtype=np.int64))
        self.removed_pending += removed
        return removed

    def search(self, queries: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
        """For each query, up to ``top`` (id, cosine distance) pairs, nearest first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        total = int(self._index.ntotal)
        k = min(top + self.removed_pending, total)
        if k <= 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        while True:
            sims, found = self._index.search(queries, k)
            live = self.ids.contains(found.ravel()).reshape(found.shape) & (found >= 0)
            enough = live.sum(axis=1).min() >= min(top, len(self))
            if enough or k >= total:
                break
            k = min(2 * k, total)  # removed ids crowd the top: look further
        return [
            [(int(i), float(max(0.0, 1.0 - s))) for i, s, ok in zip(row_ids, row_sims, row_live) if ok][:top]
            for row_ids, row_sims, row_live in zip(found, sims, live)
        ]

    def vector(self, image_id: int) -> np.ndarray:
        if image_id not in self:
            raise KeyError(image_id)
        index = self._index
        if not isinstance(index, faiss.IndexIDMap2):
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index.reconstruct(int(image_id))

    def serialize(self) -> bytes:
        index = self._index
        if faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU
            index = faiss.index_gpu_to_cpu(index)
        return faiss.serialize_index(index).tobytes()

    @classmethod
    def deserialize(
        cls, data: bytes, dim: int, factory: str = "Flat", ids: IdSet | None = None, nprobe: int = 0
    ) -> VectorIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"snapshot index is {index.d}-d, its manifest says {dim}-d")
        if ids is None:
            if not isinstance(index, faiss.IndexIDMap2):
                raise ValueError("an IVF snapshot needs its id bitmap")
            known = faiss.vector_to_array(index.id_map)
            ids = IdSet()
            ids.add(known)
        return cls(dim, factory, index, ids, nprobe)
