"""What faiss's polysemous step costs a PQ index's training, and what it changes in its answers.

index_factory turns polysemous training on for IVF-PQ: it reorders each codebook so that Hamming
distances between codes follow real ones, for a pre-filter that only searches with
``polysemous_ht`` set use. pupyl-queue never sets it, so vector_index.build turns the step off.
This trains the index ``choose_factory`` picks when only PQ fits (PQ64 for 1024-d), both ways, in
one process on the same sample, and compares recall@10 against exact search.

    .venv/bin/python bench/pq_training.py --n 50000 --nlist 256
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
from pupyl_queue.vector_index import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--pq", type=int, default=64, help="PQ sub-quantizers (bytes per vector)")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    x, queries, truth = vectors_and_truth(args.n, args.dim, args.queries)
    factory = f"IVF{args.nlist},PQ{args.pq}"
    rows = []
    for polysemous in (True, False):
        index = build(args.dim, factory)
        ivf = cpu_ivf(index)
        assert isinstance(ivf, faiss.IndexIVFPQ)
        ivf.do_polysemous_training = polysemous  # True: index_factory's default, build's before
        started = time.perf_counter()
        index.train(x)
        train_s = time.perf_counter() - started
        index.add(x)
        ivf.nprobe = 16
        _, found = index.search(queries, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
        rows.append((polysemous, train_s, recall))
        print(f"polysemous training {polysemous}: train {train_s:.1f} s, recall@10 {recall:.3f}", flush=True)
    print(
        f"\n{args.n:,} synthetic CNN-like {args.dim}-d vectors, {factory}, nprobe 16, trained on all of them"
    )
    print(f"{'polysemous training':>20} {'train s':>8} {'recall@10':>10}")
    for polysemous, train_s, recall in rows:
        print(f"{('on (faiss default)' if polysemous else 'off (now)'):>20} {train_s:8.1f} {recall:10.3f}")


if __name__ == "__main__":
    main()
