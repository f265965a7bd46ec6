"""FAISS indexes with explicit, stable int64 ids, chosen by collection size.

Inner product on L2-normalised vectors; distances are reported as cosine
distance, ``1 - cosine``: 0 for the same image, smaller is closer.

Small collections use exact search (``IDMap2,Flat``). Past a size threshold,
compaction trains an IVF index: √N-scaled lists, and the finest scalar codes
(SQ8, SQ6, SQ4) that fit the memory budget, PQ codes only when none does: on
CNN-like 1024-d vectors PQ64 keeps recall@10 near 0.43 and PQ128 near 0.60,
where SQ8 gives 0.97, SQ6 0.94 and SQ4 0.82 (BENCHMARKS.md). From 8192 lists
the coarse quantizer is an HNSW graph and is trained by two-level k-means:
flat k-means over 16k lists of 1024-d vectors takes hours on two cores.
Removal is logical at once (an id bitmap filters results; searches over-fetch
to still return ``top``) and physical at the next compaction.

A collection with whitening (pupyl_queue/whitening.py) gets an index built with the snapshot's
transform: it whitens every vector it trains on or adds and every query before FAISS sees them
(CPU or GPU alike), and gives stored vectors back raw, so callers always speak raw vectors.
Distances are then cosine distances of the whitened vectors.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from pupyl_queue import constants as C
from pupyl_queue.gpu_index import (
    GPU_MAX_K,
    coarse_template,
    cpu_ivf,
    gpu_ivf_vector,
    ivf_parts,
    to_cpu,
    to_gpu,
)
from pupyl_queue.whitening import Whitening

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _faiss_threads(queries: int) -> Iterator[None]:
    """One FAISS thread for this thread's search of a few ``queries`` (C.FAISS_PARALLEL_MIN_QUERIES),
    then the setting as it was (OpenMP keeps it per thread); every thread for more."""
    if queries >= C.FAISS_PARALLEL_MIN_QUERIES:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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

    @property
    def nbytes(self) -> int:
        """Memory the bitmap holds: one byte per id slot (a bool array; packed only in files)."""
        return int(self._bits.nbytes)


# bytes per dimension of each scalar code, finest first
SCALAR_CODES = (("SQ8", 1.0), ("SQ6", 0.75), ("SQ4", 0.5))
LARGE_NLIST = 8192  # from here: HNSW coarse quantizer, two-level k-means
OVERHEAD = 1.2  # list ids, the id bitmap and slack, over the codes themselves
HNSW_EF_PER_PROBE = 2  # HNSW coarse quantizer's efSearch per list probed (recall as a flat one)
HNSW_EF_ADD = 16  # ... and when placing new vectors, which needs only the nearest list


def choose_factory(n: int, dim: int, memory_bytes: int, flat_below: int) -> str:
    """The FAISS factory string for ``n`` vectors: exact below ``flat_below``, else IVF with the finest
    codes whose memory fits ``memory_bytes``."""
    if n < flat_below:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(nlist, n // 39))  # FAISS wants >= 39 training points per list
    ivf = f"IVF{nlist}_HNSW32" if nlist >= LARGE_NLIST else f"IVF{nlist}"
    for codes, per_dim in SCALAR_CODES:
        if n * dim * per_dim * OVERHEAD <= memory_bytes:
            return f"{ivf},{codes}"
    m = max(d for d in range(1, dim // 16 + 1) if dim % d == 0)  # 64 codes for 1024-d
    return f"{ivf},PQ{m}"


def code_bytes(factory: str, dim: int) -> int:
    """Bytes one vector's code takes in an index built from ``factory``."""
    codes = factory.split(",")[-1]
    if codes == "Flat":
        return dim * 4
    if codes.startswith("PQ"):
        return int(codes[2:].split("x")[0])
    per_dim = dict(SCALAR_CODES).get(codes)
    if per_dim is None:
        raise ValueError(f"unknown codes {codes!r} in {factory!r}")
    return math.ceil(dim * per_dim)


def index_bytes(count: int, factory: str, dim: int, id_slots: int) -> int:
    """About what an index of ``count`` vectors holds in memory: each vector's code and 8-byte id,
    plus the id bitmap at one byte per slot (``id_slots``: the highest id + 1, or more)."""
    return count * (code_bytes(factory, dim) + 8) + id_slots


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """``nlist`` k-means centroids as √nlist coarse clusters, each split by its share of the sample.

    Costs about 2·√nlist distance computations per point and iteration instead of nlist (FAISS's
    contrib.clustering does the same; this version also never asks a cluster for more centroids
    than it has points, or for none).
    """
    d = len(sample[0])
    top = faiss.Kmeans(
        d, int(math.sqrt(nlist)), niter=20, spherical=True, seed=seed, max_points_per_centroid=2000
    )
    top.train(sample)
    _, assign = top.index.search(sample, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=top.k)
    want = sizes / len(sample) * nlist
    share = np.minimum(np.floor(want).astype(np.int64), sizes)
    while share.sum() < nlist:  # the remainder, where points per centroid are highest
        room = np.where(share < sizes, sizes / (share + 1), -1.0)
        share[int(np.argmax(room))] += 1
    parts = []
    for cluster in np.flatnonzero(share):
        points = sample[assign == cluster]
        if share[cluster] == len(points):
            parts.append(points)
            continue
        km = faiss.Kmeans(d, int(share[cluster]), niter=20, spherical=True, seed=seed + int(cluster))
        km.train(points)
        parts.append(km.centroids)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def build(dim: int, factory: str) -> faiss.Index:
    """An empty index for ``factory``.

    PQ codes train without faiss's polysemous step: index_factory turns it on for IVF-PQ, to order
    each codebook for a Hamming pre-filter that only a search with ``polysemous_ht`` set uses, and
    none here does. It was nearly all of a PQ codebook's training (bench/pq_training.py), and it
    does not change which vectors a search finds (the same centroids, in another order).
    """
    if factory == "Flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(ivf := cpu_ivf(index), faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False
    return index


@contextlib.contextmanager
def _narrow_coarse_search(index: faiss.Index) -> Iterator[None]:
    """Within the block, an HNSW coarse quantizer searches HNSW_EF_ADD wide: placing a vector needs
    its one nearest list, and the efSearch that nprobe needs (1024 at 10M) made adding ~50x slower
    for the same recall (efSearch 128 instead of 16 at add changed recall@10 by 0.001)."""
    graphs = [(hnsw, hnsw.efSearch) for _, hnsw in _coarse_graphs(index)]
    for hnsw, _ in graphs:
        hnsw.efSearch = HNSW_EF_ADD
    try:
        yield
    finally:
        for hnsw, ef in graphs:
            hnsw.efSearch = ef


def _coarse_graphs(index: faiss.Index) -> list[tuple[faiss.Index, faiss.HNSW]]:
    """(IVF part, its HNSW graph) for every IVF part whose coarse quantizer is a graph (on GPUs it is
    a flat one: gpu_index.py)."""
    found = []
    for ivf in ivf_parts(index):
        coarse = getattr(ivf, "quantizer", None)
        if coarse is not None and isinstance(coarse := faiss.downcast_index(coarse), faiss.IndexHNSW):
            found.append((ivf, coarse.hnsw))
    return found


SCAN_MAX = 1024  # allowed ids up to here: their vectors are decoded and scanned, not the index
WIDEN_CAP: int | None = 8  # a filtered IVF search visits at most nprobe * this many lists (BENCHMARKS.md)


@contextlib.contextmanager
def _widened_lists(index: faiss.Index, fraction: float, most: int) -> Iterator[None]:
    """An IVF index visits nprobe / fraction lists (at most ``most``) while the block runs."""
    parts = ivf_parts(index)
    before = [int(part.nprobe) for part in parts]
    graphs = _coarse_graphs(index)
    efs = [int(hnsw.efSearch) for _, hnsw in graphs]
    try:
        for part, nprobe in zip(parts, before):
            part.nprobe = min(int(part.nlist), most, math.ceil(nprobe / fraction))
        for ivf, hnsw in graphs:
            hnsw.efSearch = HNSW_EF_PER_PROBE * int(ivf.nprobe)
        yield
    finally:
        for part, nprobe in zip(parts, before):
            part.nprobe = nprobe
        for (_, hnsw), ef in zip(graphs, efs):
            hnsw.efSearch = ef


def _selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A bitmap over the id range (ids come from a counter, so it is small: 125 KB per million ids);
    a bit test per code is cheaper than IDSelectorBatch's hash lookups. It keeps its memory alive."""
    bits = np.zeros(int(allowed.max()) // 8 + 1, dtype=np.uint8)
    np.bitwise_or.at(bits, allowed >> 3, (1 << (allowed & 7)).astype(np.uint8))
    selector = faiss.IDSelectorBitmap(len(bits) * 8, faiss.swig_ptr(bits))
    selector.referenced = bits
    return selector


class VectorIndex:
    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        index: faiss.Index | None = None,
        ids: IdSet | None = None,
        nprobe: int = 32,
        *,
        gpu: bool | None = None,
        whitening: Whitening | None = None,
    ) -> None:
        """``gpu``: place the index on the GPUs (None: when faiss sees any; False keeps it on the CPU).
        ``whitening``: the collection's, from its snapshot (None: vectors as they are)."""
        if whitening is not None and whitening.dim != dim:
            raise ValueError(f"a {whitening.dim}-d whitening for a {dim}-d index")
        self.dim = dim
        self.whitening = whitening
        self.factory = factory
        self._index = index if index is not None else build(dim, factory)
        self.ids = ids if ids is not None else IdSet()
        self.removed_pending = 0  # removed logically, still inside the FAISS index
        self._coarse: tuple[faiss.Index, str] | None = None  # the CPU coarse quantizer, to restore
        self._host: faiss.Index | None = None  # a CPU copy of a GPU index, for filtered searches
        gpus = faiss.get_num_gpus()
        if gpu and not gpus:
            raise ValueError("gpu=True, but faiss sees no GPU (faiss-cpu, or no CUDA device)")
        self.on_gpu = gpus > 0 if gpu is None else gpu
        if self.on_gpu:  # pragma: no cover - needs a GPU
            self._move_to_gpu()
        self.set_nprobe(nprobe)

    def _move_to_gpu(self) -> None:  # pragma: no cover - needs a GPU
        """Move the index to the GPUs; codes faiss has no GPU version of stay on the CPU (every factory
        choose_factory picks, SQ8/SQ6/SQ4 and PQ, with flat or HNSW lists, moved on an H200)."""
        try:
            coarse = coarse_template(self._index)
            self._index, self._coarse = to_gpu(self._index), coarse
        except RuntimeError as exc:
            log.warning("%s index stays on the CPU: %s", self.factory, str(exc).splitlines()[0])
            self.on_gpu = False

    def set_nprobe(self, nprobe: int) -> None:
        """Lists an IVF search visits; 0 = auto: max(64, nlist/32), which kept recall@10 above .95
        on CNN-like vectors at 100k and 1M (BENCHMARKS.md)."""
        for ivf in ivf_parts(self._index):  # none for Flat
            most = min(ivf.nlist, GPU_MAX_K) if self.on_gpu else ivf.nlist
            ivf.nprobe = min(most, nprobe if nprobe > 0 else max(64, ivf.nlist // 32))
        for ivf, hnsw in _coarse_graphs(self._index):
            # FAISS searches the graph with efSearch whatever the k: at its default (16) the
            # lists past the 16th were found poorly, and recall@10 stopped near 0.86 at 10M.
            hnsw.efSearch = HNSW_EF_PER_PROBE * int(ivf.nprobe)

    @property
    def nprobe(self) -> int | None:
        parts = ivf_parts(self._index)
        return int(parts[0].nprobe) if parts else None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: int) -> bool:
        return bool(self.ids.contains(np.array([image_id]))[0])

    def memory_bytes(self) -> int:
        """About what the index holds in memory: codes and ids per vector, plus the id bitmap."""
        return index_bytes(int(self._index.ntotal), self.factory, self.dim, self.ids.nbytes)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def _whiten(self, vectors: np.ndarray) -> np.ndarray:
        """What FAISS sees of raw vectors: whitened when the index has a whitening, else as they are."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.whitening is None or not len(vectors):
            return vectors
        return self.whitening.apply(vectors)

    def train(self, sample: np.ndarray, two_level: bool | None = None) -> None:
        """Train on ``sample``; two-level k-means for the coarse lists from LARGE_NLIST (None: by size)."""
        sample = self._whiten(sample)
        try:
            ivf = faiss.extract_index_ivf(self._index)
        except RuntimeError:  # not an IVF index
            ivf = None
        if ivf is not None and (ivf.nlist >= LARGE_NLIST if two_level is None else two_level):
            centroids = two_level_centroids(sample, int(ivf.nlist))
            ivf.quantizer.train(centroids)
            ivf.quantizer.add(centroids)  # IndexIVF.train then trains only the codes
        with _narrow_coarse_search(self._index):  # codes train on residuals: one list per vector
            self._index.train(sample)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add vectors whose ids are not present yet (applying a segment twice is harmless)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d vectors, got shape {vectors.shape}")
        fresh = ~self.ids.contains(ids)
        if not fresh.any():
            return 0
        with _narrow_coarse_search(self._index):
            self._index.add_with_ids(self._whiten(vectors[fresh]), ids[fresh])
        self.ids.add(ids[fresh])
        self._host = None
        return int(fresh.sum())

    def remove(self, ids: list[int]) -> int:
        """Logical removal: filtered from every result at once, dropped at the next compaction."""
        removed = self.ids.discard(np.asarray(ids, dtype=np.int64))
        self.removed_pending += removed
        return removed

    def search_within(
        self, queries: np.ndarray, top: int, allowed: np.ndarray, widen_cap: int | None = WIDEN_CAP
    ) -> list[list[tuple[int, float]]]:
        """The true top ``top`` among the ``allowed`` ids (a filter's answer), never a short list.

        FAISS skips every id the selector refuses before computing its distance, so the scan costs
        one bit test per code it visits. An IVF index visits ``nprobe / fraction`` lists, at most
        ``nprobe * widen_cap`` (WIDEN_CAP = 8: at 1M images a 1% filter kept recall@10 0.990 at 1.1x
        the unfiltered p50, where all 4,096 lists cost 2.8x for 0.992; BENCHMARKS.md); the allowed
        vectors are decoded and scanned instead when there are at most SCAN_MAX. FAISS on GPUs
        takes no selector: see _search_within_gpu.
        """
        queries = self._whiten(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        allowed = np.asarray(allowed, dtype=np.int64)
        allowed = allowed[(allowed >= 0) & self.ids.contains(allowed)]  # live ids only: no over-fetch
        if not len(allowed) or top <= 0:
            return [[] for _ in range(len(queries))]
        if self.on_gpu:  # pragma: no cover - needs a GPU
            return self._search_within_gpu(queries, top, allowed)
        return self._search_within_index(self._index, queries, top, allowed, widen_cap)

    def _search_within_index(
        self,
        index: faiss.Index,
        queries: np.ndarray,
        top: int,
        allowed: np.ndarray,
        widen_cap: int | None = WIDEN_CAP,
    ) -> list[list[tuple[int, float]]]:
        """search_within on a CPU faiss ``index`` holding this index's vectors."""
        if len(allowed) <= SCAN_MAX:  # few: decode those vectors
            return self._scan(index, queries, top, allowed)
        selector = _selector(allowed)
        parts = ivf_parts(index)
        params: faiss.SearchParameters
        if parts:
            nlist, nprobe = int(parts[0].nlist), int(parts[0].nprobe)
            fraction = len(allowed) / max(1, len(self))
            wide = min(nlist, math.ceil(nprobe / fraction), nprobe * (widen_cap or nlist))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=wide)
            if _coarse_graphs(index):  # an HNSW coarse quantizer must find that many lists
                params.quantizer_params = faiss.SearchParametersHNSW(efSearch=HNSW_EF_PER_PROBE * wide)
        else:
            params = faiss.SearchParameters(sel=selector)
        with _faiss_threads(len(queries)):
            sims, found = index.search(queries, min(top, len(allowed)), params=params)
        return [
            [(int(i), float(max(0.0, 1.0 - s))) for i, s in zip(row_ids, row_sims) if i >= 0]
            for row_ids, row_sims in zip(found, sims)
        ]

    def _search_within_gpu(
        self, queries: np.ndarray, top: int, allowed: np.ndarray
    ) -> list[list[tuple[int, float]]]:
        """search_within for an index on GPUs, which take no id selector (and, for IVF, decode one
        stored vector only by reading every list back: half a second a vector at 16k lists).

        The index's own search, lists widened by 1/fraction as on the CPU, as deep as a GPU goes
        (GPU_MAX_K), keeping the allowed ids: a row holding ``top`` of them is complete, since no
        allowed id the index ranks higher can be missing from it. Rows it cannot complete (filters
        matching under ~1% of the images) run the CPU path on a host copy of the index, made once
        and kept until the index changes. Runs on a CPU index too (the tests run it there).
        """
        rows = self._search_then_filter(queries, top, allowed, GPU_MAX_K)
        missing = [q for q, row in enumerate(rows) if row is None]
        if missing:
            host = self._host_index()
            for q, row in zip(missing, self._search_within_index(host, queries[missing], top, allowed)):
                rows[q] = row
        return [row or [] for row in rows]

    def _search_then_filter(
        self, queries: np.ndarray, top: int, allowed: np.ndarray, deepest: int
    ) -> list[list[tuple[int, float]] | None]:
        """Plain searches, deeper each round up to ``deepest``, keeping ``allowed`` ids; None for a
        query whose ``deepest`` results hold fewer than min(top, len(allowed)) of them."""
        want = min(top, len(allowed))
        fraction = len(allowed) / max(1, len(self))
        total = min(int(self._index.ntotal), deepest)
        k = min(total, max(4 * top, math.ceil(2 * top / fraction)) + self.removed_pending)
        rows: list[list[tuple[int, float]] | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        with _widened_lists(self._index, fraction, deepest):
            while pending and k > 0:
                sims, found = self._index.search(queries[pending], k)
                keep = np.isin(found, allowed)
                for j, q in enumerate(pending):
                    if keep[j].sum() >= want:
                        hits = zip(found[j][keep[j]], sims[j][keep[j]])
                        rows[q] = [(int(i), float(max(0.0, 1.0 - s))) for i, s in hits][:top]
                pending = [q for q in pending if rows[q] is None]
                if k >= total:
                    break
                k = min(2 * k, total)
        return rows

    def _host_index(self) -> faiss.Index:
        """A CPU faiss index with this index's vectors: the index itself, or a copy of a GPU one."""
        if not self.on_gpu:
            return self._index
        if self._host is None:  # pragma: no cover - needs a GPU
            self._host = self._cpu_index()
        return self._host

    def _scan(
        self, index: faiss.Index, queries: np.ndarray, top: int, allowed: np.ndarray
    ) -> list[list[tuple[int, float]]]:
        """Exact over the stored codes: the allowed vectors decoded, every one compared."""
        if not isinstance(index, faiss.IndexIDMap2):
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        vectors = index.reconstruct_batch(allowed)
        sims = queries @ vectors.T
        order = np.argsort(-sims, axis=1)[:, :top]
        return [
            [(int(allowed[j]), float(max(0.0, 1.0 - row[j]))) for j in idx] for row, idx in zip(sims, order)
        ]

    def search(
        self, queries: np.ndarray, top: int, raw_distances: bool = False
    ) -> list[list[tuple[int, float]]]:
        """For each query, up to ``top`` (id, cosine distance) pairs, nearest first.

        ``raw_distances``: with a whitening, the WHITENING_RESCORE nearest by whitened cosine (or
        ``top``, if more) re-scored by the raw vectors' cosine, nearest first, so a threshold set
        on raw cosine distances (the near-duplicate check) keeps its meaning. No effect without one.
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if raw_distances and self.whitening is not None:
            return self._raw_rescored(queries, top)
        queries = self._whiten(queries)
        total = int(self._index.ntotal)
        if self.on_gpu:  # pragma: no cover - needs a GPU
            total = min(total, GPU_MAX_K)  # the most a GPU returns: more removed ids may leave < top
        k = min(top + self.removed_pending, total)
        if k <= 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        while True:
            with _faiss_threads(len(queries)):
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

    def _raw_rescored(self, queries: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
        """search(..., raw_distances=True) with a whitening: whitened hits, raw cosine distances."""
        raw = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
        rows = []
        for query, hits in zip(raw, self.search(queries, max(top, C.WHITENING_RESCORE))):
            if not hits:
                rows.append([])
                continue
            stored = np.stack([self.vector(image_id) for image_id, _ in hits])
            sims = stored @ query
            order = np.argsort(-sims, kind="stable")[:top]
            rows.append([(hits[j][0], float(max(0.0, 1.0 - sims[j]))) for j in order])
        return rows

    def vector(self, image_id: int) -> np.ndarray:
        """An indexed image's vector as it was added (raw: a whitened index gives it back unwhitened)."""
        stored = self._stored(image_id)
        return stored if self.whitening is None else self.whitening.invert(stored)[0]

    def _stored(self, image_id: int) -> np.ndarray:
        """An indexed image's vector as FAISS holds it (whitened, in a whitened index)."""
        if image_id not in self:
            raise KeyError(image_id)
        index = self._index
        if self.on_gpu and not isinstance(index, faiss.IndexIDMap2):  # pragma: no cover - needs a GPU
            return gpu_ivf_vector(ivf_parts(index)[0], int(image_id))
        if not isinstance(index, faiss.IndexIDMap2):
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index.reconstruct(int(image_id))

    def _cpu_index(self) -> faiss.Index:
        """The index itself, or on GPUs a CPU copy as it was built (HNSW coarse quantizer included)."""
        if self.on_gpu:  # pragma: no cover - needs a GPU
            return to_cpu(self._index, self._coarse)
        return self._index

    def serialize(self) -> bytes:
        return faiss.serialize_index(self._cpu_index()).tobytes()

    @classmethod
    def deserialize(
        cls,
        data: bytes,
        dim: int,
        factory: str = "Flat",
        ids: IdSet | None = None,
        nprobe: int = 0,
        whitening: Whitening | None = None,
    ) -> VectorIndex:
        return cls._wrap(
            faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), dim, factory, ids, nprobe, whitening
        )

    def write(self, path: str | Path) -> None:
        """Write the index to a file. FAISS streams it out: ``serialize`` holds the index and up to
        three whole copies of its bytes at once, too much for a 10M-vector snapshot."""
        faiss.write_index(self._cpu_index(), str(path))

    @classmethod
    def read(
        cls,
        path: str | Path,
        dim: int,
        factory: str = "Flat",
        ids: IdSet | None = None,
        nprobe: int = 0,
        whitening: Whitening | None = None,
    ) -> VectorIndex:
        """Read an index file written by ``write``, streamed (one copy in memory, not two).
        ``whitening``: the snapshot's, when it has one (its index holds whitened vectors)."""
        return cls._wrap(faiss.read_index(str(path)), dim, factory, ids, nprobe, whitening)

    @classmethod
    def _wrap(
        cls,
        index: faiss.Index,
        dim: int,
        factory: str,
        ids: IdSet | None,
        nprobe: int,
        whitening: Whitening | None = None,
    ) -> VectorIndex:
        if index.d != dim:
            raise ValueError(f"snapshot index is {index.d}-d, its manifest says {dim}-d")
        if ids is None:
            if not isinstance(index, faiss.IndexIDMap2):
                raise ValueError("an IVF snapshot needs its id bitmap")
            known = faiss.vector_to_array(index.id_map)
            ids = IdSet()
            ids.add(known)
        return cls(dim, factory, index, ids, nprobe, whitening=whitening)
