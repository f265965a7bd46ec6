"""VectorIndex on a GPU against the same index kept on the CPU (issue #5). Skipped without a GPU.

Runs on a lent GPU machine through bench/gpu/device_run.sh (BENCHMARKS.md); CI has no GPU.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pupyl_queue.vector_index import IdSet, VectorIndex

pytestmark = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU that faiss can use")

DIM = 256
N = 20_000


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 20 centres, each split over several lists: IVF64 recall@10 is about .57 at
    nprobe 1 and .98 at 16 (on the CPU), so whether nprobe reaches the index shows."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(20, DIM))
    x = centers[rng.integers(0, 20, n)] + rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids, vectors, queries, and the exact top-10 ids of each query."""
    vectors, queries = clustered(N, 0), clustered(100, 1)
    ids = np.arange(1, N + 1, dtype=np.int64) * 3  # not row numbers
    exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    return ids, vectors, queries, exact


def built(factory: str, data: tuple, gpu: bool, nprobe: int = 16) -> VectorIndex:
    ids, vectors, _, _ = data
    index = VectorIndex(DIM, factory, nprobe=nprobe, gpu=gpu)
    if not index.is_trained:
        index.train(vectors)
    index.add(ids, vectors)
    return index


def recall(index: VectorIndex, queries: np.ndarray, exact: np.ndarray) -> float:
    found = index.search(queries, 10)
    return float(
        np.mean([len({i for i, _ in row} & set(top.tolist())) / 10 for row, top in zip(found, exact)])
    )


def test_flat_on_gpu_is_exact(data: tuple) -> None:
    ids, vectors, queries, exact = data
    index = built("Flat", data, gpu=True)
    assert index.on_gpu and index.nprobe is None
    assert [[i for i, _ in row] for row in index.search(queries, 10)] == exact.tolist()
    np.testing.assert_allclose(index.vector(int(ids[7])), vectors[7], atol=1e-6)


@pytest.mark.parametrize("factory", ["IVF64,SQ8", "IVF64_HNSW32,SQ8", "IVF64_HNSW32,PQ64"])
def test_ivf_on_gpu_recalls_as_on_cpu_and_applies_nprobe(factory: str, data: tuple) -> None:
    _, _, queries, exact = data
    gpu, cpu = built(factory, data, gpu=True), built(factory, data, gpu=False)
    assert gpu.on_gpu and gpu.nprobe == cpu.nprobe == 16
    wide = recall(gpu, queries, exact)
    assert wide == pytest.approx(recall(cpu, queries, exact), abs=0.05)
    gpu.set_nprobe(1)
    assert gpu.nprobe == 1
    assert recall(gpu, queries, exact) < wide - 0.1  # nprobe reaches the GPU index
    gpu.set_nprobe(0)  # auto: max(64, nlist / 32), at most nlist
    assert gpu.nprobe == 64


def test_removed_ids_are_filtered_on_gpu(data: tuple) -> None:
    ids, vectors, queries, exact = data
    index = built("IVF64,SQ8", data, gpu=True, nprobe=64)
    nearest = [i for i, _ in index.search(queries[0], 10)[0]]
    assert index.remove(nearest) == 10
    hits = [i for i, _ in index.search(queries[0], 10)[0]]
    assert len(hits) == 10 and not set(hits) & set(nearest)


@pytest.mark.parametrize("factory", ["Flat", "IVF64_HNSW32,SQ8", "IVF64_HNSW32,PQ64"])
def test_serialize_round_trip_from_gpu(factory: str, data: tuple) -> None:
    ids, vectors, queries, _ = data
    index = built(factory, data, gpu=True)
    snapshot = index.serialize()
    cpu = faiss.deserialize_index(np.frombuffer(snapshot, dtype=np.uint8))
    assert cpu.ntotal == N
    if factory != "Flat":  # the snapshot keeps the HNSW coarse quantizer its factory names
        assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(cpu).quantizer), faiss.IndexHNSWFlat)
    ids_again = IdSet.from_bytes(index.ids.to_bytes(), index.ids.size)
    again = VectorIndex.deserialize(snapshot, DIM, factory, ids_again, 16)
    assert again.on_gpu and len(again) == N
    before, after = index.search(queries[:20], 10), again.search(queries[:20], 10)
    overlap = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in zip(before, after)])
    assert overlap >= 0.95


@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8", "IVF64_HNSW32,PQ64"])
def test_vector_on_gpu_matches_the_cpu_copy(factory: str, data: tuple) -> None:
    ids, vectors, _, _ = data
    index = built(factory, data, gpu=True)
    snapshot = index.serialize()
    again = VectorIndex.deserialize(snapshot, DIM, factory, index.ids, 16)  # back on the GPU
    reference = faiss.deserialize_index(np.frombuffer(snapshot, dtype=np.uint8))  # stays on the CPU
    if factory != "Flat":
        faiss.extract_index_ivf(reference).set_direct_map_type(faiss.DirectMap.Hashtable)
    for row in (0, 4321, N - 1):
        got = index.vector(int(ids[row]))
        np.testing.assert_allclose(got, reference.reconstruct(int(ids[row])), atol=1e-4)
        np.testing.assert_allclose(again.vector(int(ids[row])), got, atol=1e-4)
        assert float(got @ vectors[row]) > (0.99 if "PQ" not in factory else 0.7)


def test_compaction_path_trains_and_adds_on_gpu(data: tuple) -> None:
    """As pupyl_queue.compaction: an untrained index, trained on a sample, filled, serialized."""
    ids, vectors, queries, exact = data
    index = VectorIndex(DIM, "IVF64_HNSW32,SQ8", nprobe=16)
    assert index.on_gpu and not index.is_trained
    index.train(vectors[::2])
    for start in range(0, N, 5000):
        index.add(ids[start : start + 5000], vectors[start : start + 5000])
    assert recall(index, queries, exact) > 0.9
    assert index.memory_bytes() == N * (DIM + 8) + index.ids.nbytes
    cpu = faiss.deserialize_index(np.frombuffer(index.serialize(), dtype=np.uint8))
    assert cpu.is_trained and cpu.ntotal == N


@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8"])
@pytest.mark.parametrize("share", [0.0005, 0.02, 0.3])
def test_filtered_search_on_gpu_finds_what_the_cpu_finds(factory: str, share: float, data: tuple) -> None:
    """GPUs take no id selector: deeper plain searches kept to the allowed ids, the host copy for
    rows they leave short. The answer is as good as the CPU index's own, and never a short list."""
    ids, _, queries, _ = data
    gpu, cpu = built(factory, data, gpu=True), built(factory, data, gpu=False)
    allowed = np.sort(np.random.default_rng(5).choice(ids, max(1, int(len(ids) * share)), replace=False))
    on_gpu, on_cpu = gpu.search_within(queries, 10, allowed), cpu.search_within(queries, 10, allowed)
    assert all(len(row) == min(10, len(allowed)) for row in on_gpu)
    assert all({i for i, _ in row} <= set(allowed.tolist()) for row in on_gpu)
    same = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / len(b) for a, b in zip(on_gpu, on_cpu)])
    assert same >= (0.999 if factory == "Flat" else 0.9), same
