"""FAISS on GPUs: moving a VectorIndex's FAISS index there and back, and what faiss lacks there.

On a machine where faiss sees GPUs, a VectorIndex lives on them: searches, training and adds run
there, and serialize/write bring a CPU copy back, so snapshots stay CPU indexes. Checked on an
H200 (bench/gpu/, tests/test_gpu_index.py); every function here needs a GPU except ivf_parts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import faiss
import numpy as np

GPU_MAX_K = 2048  # faiss GPU k-selection limit, both for search's k and for nprobe
GPU_SHARED_MEMORY = 48 * 1024  # bytes of shared memory per block that faiss GPU IVF-PQ checks against


@functools.cache
def _gpu_resources() -> tuple[faiss.StandardGpuResources, ...]:
    """One StandardGpuResources per GPU for the whole process, shared by every index.

    Each holds a stream, a cuBLAS handle and about 1.5 GiB of scratch memory: faiss's own
    index_cpu_to_all_gpus makes new ones per call, which a worker serving many collections would pay
    per collection. They are not thread-safe; search and maintenance workers run ``--pool solo``.
    """
    return tuple(faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus()))


def cpu_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IndexIVF inside a CPU ``index`` (downcast: IVF-SQ, IVF-PQ...), or None for Flat."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def ivf_parts(index: faiss.Index) -> list:
    """The objects holding ``nlist`` and ``nprobe`` in ``index``, CPU or GPU.

    On a CPU it is the IndexIVF. On GPUs it is a GpuIndexIVF per GPU, which faiss.extract_index_ivf
    does not find (it is no IndexIVF): through it, set_nprobe did nothing on GPUs and nprobe read None.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return [ivf]
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return ivf_parts(index.index)
    if isinstance(index, faiss.IndexReplicas):  # one full copy per GPU
        return [part for i in range(index.count()) for part in ivf_parts(index.at(i))]
    return [index] if hasattr(index, "nprobe") else []


def coarse_template(index: faiss.Index) -> tuple[faiss.Index, str] | None:
    """An empty copy of a CPU IVF's coarse quantizer when it is not flat (HNSW), and how it trains.

    GPUs take flat coarse quantizers only, so a GPU copy gets a flat one holding the same centroids
    (exact, and faster there than a graph); ``to_cpu`` rebuilds the HNSW graph from this template so
    that snapshots keep the factory their manifest names.
    """
    ivf = cpu_ivf(index)
    if ivf is None or isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        return None
    empty = faiss.clone_index(ivf.quantizer)
    empty.reset()
    return empty, ivf.quantizer_trains_alone


@contextlib.contextmanager
def _flat_coarse_quantizer(ivf: faiss.IndexIVF | None) -> Iterator[None]:
    """Within the block, ``ivf``'s coarse quantizer is an IndexFlat with the same centroids."""
    coarse = None if ivf is None else faiss.downcast_index(ivf.quantizer)
    if coarse is None or isinstance(coarse, faiss.IndexFlat):
        yield
        return
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    if coarse.ntotal:
        flat.add(coarse.reconstruct_n(0, coarse.ntotal))
    ivf.quantizer = flat
    try:
        yield
    finally:
        ivf.quantizer = coarse


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of a CPU ``index`` on every GPU (one replica each), with a flat coarse quantizer.

    IVF-PQ lookup tables are float16 when float32 ones would not fit in a block's shared memory:
    PQ64 takes 64 x 256 x 4 = 64 KiB, and faiss refuses it otherwise. Raises RuntimeError for codes
    faiss has no GPU version of.
    """
    options = faiss.GpuMultipleClonerOptions()
    ivf = cpu_ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        options.useFloat16 = ivf.pq.M * ivf.pq.ksub * 4 > GPU_SHARED_MEMORY
    if ivf is not None:
        ivf.nprobe = min(ivf.nprobe, GPU_MAX_K)  # faiss refuses to copy a larger one
    with _flat_coarse_quantizer(ivf):  # SWIG returns it downcast, and owned: no downcast_index here
        return faiss.index_cpu_to_gpu_multiple_py(list(_gpu_resources()), index, options)


def to_cpu(index: faiss.Index, coarse: tuple[faiss.Index, str] | None) -> faiss.Index:
    """A CPU copy of a GPU ``index``; its coarse quantizer rebuilt from ``coarse`` (see coarse_template)."""
    cpu = faiss.index_gpu_to_cpu(index)
    ivf = cpu_ivf(cpu)
    if coarse is None or ivf is None:
        return cpu
    flat = faiss.downcast_index(ivf.quantizer)
    rebuilt = faiss.clone_index(coarse[0])
    if flat.ntotal:
        rebuilt.add(flat.reconstruct_n(0, flat.ntotal))
    flat.this.acquire()  # Python frees the flat quantizer the copy owned...
    rebuilt.this.disown()  # ...and the copy owns and frees the rebuilt one
    ivf.quantizer = rebuilt
    ivf.quantizer_trains_alone = coarse[1]
    return cpu


def gpu_ivf_vector(ivf: faiss.Index, image_id: int) -> np.ndarray:
    """One stored vector of a GPU IVF index, which has no reconstruct().

    Its list is found by reading back each list's ids (nlist small copies: about half a second at
    16k lists), then its code is decoded on the CPU, plus the list's centroid when codes are residuals.
    """
    for list_no in range(ivf.nlist):
        hit = np.flatnonzero(_as_array(ivf.getListIndices(list_no)) == image_id)
        if len(hit):
            return _gpu_ivf_decode(ivf, list_no, int(hit[0]))
    raise KeyError(image_id)


def _gpu_ivf_decode(ivf: faiss.Index, list_no: int, offset: int) -> np.ndarray:
    codes = _as_array(ivf.getListVectorData(list_no, False))  # the CPU layout, one code after another
    size = len(codes) // ivf.getListLength(list_no)
    code = codes[offset * size : (offset + 1) * size][None]
    if isinstance(ivf, faiss.GpuIndexIVFFlat):
        return code.view(np.float32)[0]
    codec = ivf.sq if isinstance(ivf, faiss.GpuIndexIVFScalarQuantizer) else ivf.pq
    vector = codec.decode(code)[0]
    if getattr(ivf, "by_residual", True):  # GPU IVF-PQ always encodes residuals
        vector = vector + faiss.downcast_index(ivf.quantizer).reconstruct(list_no)
    return vector


def _as_array(values: object) -> np.ndarray:
    """A numpy array from what SWIG returns for a std::vector: a faiss vector, or a tuple."""
    return np.asarray(values) if isinstance(values, tuple | list) else faiss.vector_to_array(values)
