"""Which IVF codes keep recall on CNN-like 1024-d vectors: scalar (SQ8/6/4) against product (PQ) codes.

The index chooser (pupyl_queue/vector_index.py) takes the finest scalar codes that fit the memory
budget and PQ only when none does; this prints the evidence. One coarse quantizer (k-means, trained
once) is shared by every code type, so only the codes differ. Recall@10 is against exact search.

    .venv/bin/python bench/index_codes.py --n 200000 --nlist 2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.index_scale import vectors_and_truth  # noqa: E402
from pupyl_queue.gpu_index import cpu_ivf  # noqa: E402
from pupyl_queue.vector_index import build as build_index  # noqa: E402

CODES = ["SQ8", "SQ6", "SQ4", "PQ128", "PQ64", "PQ256x4fs", "PQ64+RefineSQ8"]


def build(codes: str, centroids: np.ndarray, dim: int) -> faiss.Index:
    """An IVF index over the given centroids with ``codes``; ``+RefineSQ8`` re-ranks 4x top with SQ8."""
    nlist = len(centroids)
    base_codes, _, refine = codes.partition("+")
    # The product's builder: PQ codes without faiss's polysemous step, as compaction trains them.
    index = build_index(dim, f"IVF{nlist},{base_codes}")
    ivf = cpu_ivf(index)
    assert ivf is not None
    ivf.quantizer.add(centroids)  # trained once, shared: IndexIVF.train then trains the codes only
    if refine:
        index = faiss.IndexRefine(
            index, faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        )
        index.k_factor = 4
    return index


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--nprobe", default="64,128")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--codes", default=",".join(CODES), help="comma-separated; PQ needs dim % M == 0")
    args = parser.parse_args()
    x, queries, truth = vectors_and_truth(args.n, args.dim, args.queries)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    kmeans = faiss.Kmeans(args.dim, args.nlist, niter=10, seed=0, spherical=True)
    kmeans.train(x[rng.choice(args.n, min(args.n, 64 * args.nlist), replace=False)])
    print(f"k-means {args.nlist} lists: {time.perf_counter() - started:.0f} s", flush=True)
    sample = x[rng.choice(args.n, min(args.n, 65_536), replace=False)]
    rows = []
    for codes in args.codes.split(","):
        index = build(codes, kmeans.centroids, args.dim)
        started = time.perf_counter()
        index.train(sample)
        index.add(x)
        build_s = time.perf_counter() - started
        code = faiss.extract_index_ivf(index).code_size + (args.dim if "+" in codes else 0)
        for nprobe in (int(v) for v in args.nprobe.split(",")):
            faiss.extract_index_ivf(index).nprobe = nprobe
            started = time.perf_counter()
            _, found = index.search(queries, 10)
            ms = (time.perf_counter() - started) * 1000 / len(queries)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            rows.append((codes, code, nprobe, recall, ms, build_s))
            print(f"  {codes} nprobe {nprobe}: recall@10 {recall:.3f}", flush=True)
    print(
        f"\n{args.n:,} synthetic CNN-like {args.dim}-d vectors, IVF{args.nlist}, {args.queries} queries, "
        f"batch search, {time.strftime('%Y-%m-%d')}"
    )
    header = ("codes", "bytes/vector", "nprobe", "recall@10", "ms/query", "train+add s")
    print("{:>15} {:>12} {:>6} {:>9} {:>8} {:>11}".format(*header))
    for codes, code, nprobe, recall, ms, build_s in rows:
        print(f"{codes:>15} {code:>12} {nprobe:>6} {recall:>9.3f} {ms:>8.2f} {build_s:>11.1f}")


if __name__ == "__main__":
    main()
