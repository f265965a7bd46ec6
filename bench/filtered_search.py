"""Filtered search at scale (issue #17): the true top-10 among the images a filter allows.

One process, one index, the same queries: an unfiltered search next to searches filtered to 1% and
0.01% of the images, timed as the search worker runs them (the filter evaluated on the attribute
column store, then FAISS with an id selector), with recall@10 against an exact float32 scan of the
filtered subset. A post-filter of the plain top 10 is shown for contrast (what a caller got before:
short lists). Then the column store's memory for three attributes at 1M and 10M images.

    .venv/bin/python bench/filtered_search.py                     # 1M x 1024-d, 200 queries
    .venv/bin/python bench/filtered_search.py --n 20000 --dim 64 --queries 20 --table-sizes 20000  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.index_scale import generator  # noqa: E402
from pupyl_queue.attributes import AttributeTable, parse_filter  # noqa: E402
from pupyl_queue.vector_index import VectorIndex, choose_factory  # noqa: E402

CATEGORIES = 100  # one category = 1% of the images
GROUPS = 10_000  # one group = 0.01%


def attributes(start: int, count: int) -> list[dict[str, object]]:
    """Three attributes per image: a category (100 values), a group (10,000) and a price."""
    rng = np.random.default_rng(start)
    prices = np.round(rng.uniform(1, 1000, count), 2)
    return [
        {
            "category": f"c{(start + i) % CATEGORIES}",
            "group": f"g{(start + i) * 7919 % GROUPS}",
            "price": float(p),
        }
        for i, p in zip(range(count), prices)
    ]


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--table-sizes", default="1000000,10000000")
    parser.add_argument("--caps", default="0", help="widening caps to compare for the 1%% filter (0: none)")
    args = parser.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    vectors_of = generator()
    n, dim = args.n, args.dim
    factory = choose_factory(n, dim, 12 * 1024**3, 100_000)
    index = VectorIndex(dim, factory, nprobe=0, gpu=False)
    table = AttributeTable()
    wanted_categories = {f"c{c}" for c in range(5)}
    wanted_groups = {f"g{g}" for g in range(20)}
    kept_ids: list[np.ndarray] = []
    kept_vectors: list[np.ndarray] = []
    clusters = vectors_of._clusters(n)  # queries and training sample from the same subjects
    started = time.perf_counter()
    if not index.is_trained:
        index.train(vectors_of.vectors(min(n, 200_000), d=dim, seed=2, clusters=clusters))
    chunk = 100_000
    for number, block in enumerate(vectors_of.iter_vectors(n, d=dim, seed=0, chunk=chunk)):
        first = number * chunk
        ids = np.arange(first, first + len(block), dtype=np.int64) + 1
        index.add(ids, block)
        rows = attributes(first, len(block))
        table.add(ids, rows)
        keep = np.array([r["category"] in wanted_categories or r["group"] in wanted_groups for r in rows])
        kept_ids.append(ids[keep])
        kept_vectors.append(block[keep])
    build_s = time.perf_counter() - started
    subset_ids = np.concatenate(kept_ids)
    subset_vectors = np.concatenate(kept_vectors)
    position = {int(i): k for k, i in enumerate(subset_ids)}
    queries = vectors_of.vectors(args.queries, d=dim, seed=1, clusters=clusters)

    def exact(query: np.ndarray, allowed: np.ndarray) -> list[int]:
        rows = np.array([position[int(i)] for i in allowed])
        sims = subset_vectors[rows] @ query
        return [int(allowed[j]) for j in np.argsort(-sims)[:10]]

    filters = [(f"1% (lists capped at nprobe x {c})" if c else "1%", "c", c or None) for c in caps]
    filters.append(("0.01%", "g", None))
    labels = [label for label, _, _ in filters]
    timings: dict[str, list[float]] = {"unfiltered": [], **{label: [] for label in labels}}
    recalls: dict[str, list[float]] = {label: [] for label in labels}
    post_filter_left: dict[str, list[int]] = {label: [] for label in labels}
    selected: dict[str, list[int]] = {label: [] for label in labels}
    for q, query in enumerate(queries):
        t0 = time.perf_counter()
        plain = index.search(query[None], 10)[0]
        timings["unfiltered"].append(time.perf_counter() - t0)
        for label, kind, cap in filters:
            spec = {"category": f"c{q % 5}"} if kind == "c" else {"group": f"g{q % 20}"}
            t0 = time.perf_counter()
            allowed = table.select(parse_filter(spec))
            found = index.search_within(query[None], 10, allowed, widen_cap=cap)[0]
            timings[label].append(time.perf_counter() - t0)
            truth = exact(query, allowed)
            recalls[label].append(len({i for i, _ in found} & set(truth)) / len(truth))
            allowed_set = set(allowed.tolist())
            post_filter_left[label].append(sum(1 for i, _ in plain if i in allowed_set))
            selected[label].append(len(allowed))

    print(
        f"\n{n:,} x {dim}-d, {factory} (nprobe {index.nprobe}), {args.queries} queries, top 10, one process"
    )
    print(f"build (train + add + attribute table): {build_s:.1f} s\n")
    print(
        "| search | images allowed | p50 ms | p99 ms | recall@10 vs exact filtered "
        "| a post-filter of the plain top 10 keeps |"
    )
    print("|---|---|---|---|---|---|")
    unfiltered = timings["unfiltered"]
    print(
        f"| unfiltered | {n:,} | {p50_ms(unfiltered):.2f} | "
        f"{np.percentile(unfiltered, 99) * 1000:.2f} | – | – |"
    )
    for label in labels:
        values = timings[label]
        print(
            f"| filter {label} | {int(statistics.median(selected[label])):,} | {p50_ms(values):.2f} | "
            f"{np.percentile(values, 99) * 1000:.2f} | {statistics.mean(recalls[label]):.3f} | "
            f"{statistics.mean(post_filter_left[label]):.2f} of 10 |"
        )
    print(f"\nattribute column store at {n:,}: {table.nbytes() / 2**20:.1f} MiB (3 attributes)")

    for size in [int(s) for s in args.table_sizes.split(",") if s]:
        t0 = time.perf_counter()
        big = AttributeTable()
        for first in range(0, size, chunk):
            count = min(chunk, size - first)
            big.add(np.arange(first, first + count) + 1, attributes(first, count))
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        selected_big = big.select(parse_filter({"category": "c1", "price": {"lt": 500}}))
        took = (time.perf_counter() - t0) * 1000
        print(
            f"attribute column store at {size:,}: {big.nbytes() / 2**20:.1f} MiB, built in {built:.1f} s; "
            f"a two-condition filter selects {len(selected_big):,} ids in {took:.1f} ms"
        )
        del big


if __name__ == "__main__":
    main()
