"""VectorIndex on the CPU against the GPU: the same data, in the same process (issue #5).

For each factory, one VectorIndex kept on the CPU (``gpu=False``) and one moved to the GPUs, through
the same code path a compaction and a search worker take: train on a compaction-sized sample, add in
200k-row chunks, search (single queries and batches of 64: p50/p99), recall@10 against exact search,
serialize. Then probes of what faiss itself does on a GPU (the questions behind the fixes in
pupyl_queue/vector_index.py). Synthetic CNN-like vectors from ../shared/bench/vectors.py.

    python bench/gpu_index.py --n 1000000 --factories Flat,IVF4096,SQ8,IVF16384_HNSW32,PQ64
    (bench/gpu/device_run.sh runs it on a lent GPU machine)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # appended: a pupyl_queue already on the path (installed, or a stub) wins

from pupyl_queue import vector_index  # noqa: E402
from pupyl_queue.vector_index import VectorIndex  # noqa: E402

TRAIN_PER_LIST = 64  # as pupyl_queue.compaction
CHUNK = 200_000
FACTORY_SEP = ";"


def load_generator(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_vectors", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def nlist_of(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head.removeprefix("IVF").split("_")[0]) if head.startswith("IVF") else 0


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def recall(index: VectorIndex, queries: np.ndarray, exact: np.ndarray) -> float:
    found = index.search(queries, 10)
    return float(
        np.mean([len({i for i, _ in row} & set(truth.tolist())) / 10 for row, truth in zip(found, exact)])
    )


def measure(factory: str, gpu: bool, base: np.ndarray, queries: np.ndarray, exact: np.ndarray, args) -> dict:
    """Build, search and serialize one index; a dict of the figures."""
    ids = np.arange(1, len(base) + 1, dtype=np.int64)
    index = VectorIndex(base.shape[1], factory, nprobe=args.nprobe, gpu=gpu)
    row: dict = {"placed": "GPU" if index.on_gpu else "CPU"}
    if not index.is_trained:
        want = min(len(base), max(TRAIN_PER_LIST * nlist_of(factory), 10_000))
        sample = base[np.random.default_rng(0).choice(len(base), want, replace=False)]
        row["train_s"], _ = timed(lambda: index.train(sample))
    row["add_s"], _ = timed(
        lambda: [index.add(ids[i : i + CHUNK], base[i : i + CHUNK]) for i in range(0, len(base), CHUNK)]
    )
    row["nprobe"] = index.nprobe
    index.search(queries[:8], 10)  # warm-up (GPU kernels, scratch memory)
    singles = [timed(lambda q=q: index.search(q, 10))[0] * 1e3 for q in queries[: args.singles]]
    row["single_p50_ms"], row["single_p99_ms"] = percentiles(singles)
    batches = [queries[i : i + 64] for i in range(0, min(len(queries), 64 * args.batches), 64)]
    batch_ms = [timed(lambda b=b: index.search(b, 10))[0] * 1e3 for b in batches]
    row["batch64_p50_ms"], row["batch64_p99_ms"] = percentiles(batch_ms)
    row["recall@10"] = recall(index, queries, exact)
    index.vector(int(ids[0]))  # the CPU builds its id -> list map on the first call
    vector_ms = [timed(lambda i=i: index.vector(int(i)))[0] * 1e3 for i in ids[:: len(ids) // 5][:5]]
    row["vector_ms"] = statistics.median(vector_ms)
    row["serialize_s"], data = timed(index.serialize)
    row["snapshot_mb"] = len(data) / 1e6  # type: ignore[arg-type]
    return row


COLUMNS = [
    ("placed", "{}"),
    ("train_s", "{:.1f}"),
    ("add_s", "{:.1f}"),
    ("nprobe", "{}"),
    ("single_p50_ms", "{:.2f}"),
    ("single_p99_ms", "{:.2f}"),
    ("batch64_p50_ms", "{:.1f}"),
    ("batch64_p99_ms", "{:.1f}"),
    ("recall@10", "{:.3f}"),
    ("vector_ms", "{:.1f}"),
    ("serialize_s", "{:.1f}"),
    ("snapshot_mb", "{:.0f}"),
]


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per factory and figure, CPU and GPU side by side."""
    lines = ["| factory | figure | CPU | GPU |", "| --- | --- | --- | --- |"]
    for factory, sides in results.items():
        for key, fmt in COLUMNS:
            cells = []
            for side in ("CPU", "GPU"):
                got = sides.get(side, {})
                value = got.get(key)
                cells.append(
                    got["error"]
                    if "error" in got and key == "placed"
                    else "-"
                    if value is None
                    else fmt.format(value)
                )
            lines.append(f"| {factory} | {key} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def probe(name: str, fn: Callable[[], object]) -> None:
    try:
        print(f"probe {name}: {fn()}")
    except Exception as exc:  # a probe reports what faiss says, whatever it is
        print(f"probe {name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")


def probes(dim: int) -> None:
    """What faiss does on a GPU with the calls VectorIndex used to make (before issue #5's fixes)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def trained(factory: str) -> faiss.Index:
        index = vector_index.build(dim, factory)
        index.train(x)
        index.add_with_ids(x, np.arange(len(x)))
        return index

    def old_nprobe() -> str:
        gpu = faiss.index_cpu_to_all_gpus(trained("IVF64,SQ8"))
        faiss.extract_index_ivf(gpu)
        return "extract_index_ivf found the GPU IVF"

    def plain_clone(factory: str) -> str:
        gpu = faiss.index_cpu_to_all_gpus(trained(factory))
        return type(faiss.downcast_index(gpu)).__name__

    def gpu_reconstruct() -> str:
        gpu = faiss.index_cpu_to_all_gpus(trained("IVF64,SQ8"))
        return str(gpu.reconstruct(5)[:3])

    def big_k() -> str:
        gpu = faiss.index_cpu_to_all_gpus(trained("IVF64,SQ8"))
        gpu.search(x[:1], 4096)
        return "k=4096 accepted"

    probe("extract_index_ivf(GPU IVF) [old set_nprobe]", old_nprobe)
    probe("index_cpu_to_all_gpus IVF64_HNSW32,SQ8 [old __init__]", lambda: plain_clone("IVF64_HNSW32,SQ8"))
    probe("index_cpu_to_all_gpus IVF64,PQ64 without float16 tables", lambda: plain_clone("IVF64,PQ64"))
    probe("index_cpu_to_all_gpus IVF64,SQ6", lambda: plain_clone("IVF64,SQ6"))
    probe("index_cpu_to_all_gpus IVF64,SQ4", lambda: plain_clone("IVF64,SQ4"))
    probe("GPU IVF reconstruct [old vector()]", gpu_reconstruct)
    probe("GPU IVF search k=4096", big_k)
    for factory in ("IVF64,SQ6", "IVF64,SQ4", "IVF64_HNSW32,PQ64"):
        probe(f"VectorIndex {factory} placed on", lambda f=factory: _placed(f, dim, x))


def _placed(factory: str, dim: int, x: np.ndarray) -> str:
    index = VectorIndex(dim, factory)
    index.train(x)
    index.add(np.arange(1, len(x) + 1), x)
    hits = index.search(x[:1], 3)[0]
    return f"{'GPU' if index.on_gpu else 'CPU'}, nprobe {index.nprobe}, top ids {[i for i, _ in hits]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=200, help="single-query searches timed")
    parser.add_argument("--batches", type=int, default=10, help="batches of 64 timed")
    parser.add_argument("--nprobe", type=int, default=0, help="0: VectorIndex's auto rule")
    parser.add_argument(
        "--factories", default="Flat;IVF4096,SQ8;IVF16384_HNSW32,PQ64", help=f"'{FACTORY_SEP}'-separated"
    )
    parser.add_argument("--sides", default="GPU,CPU")
    parser.add_argument("--vectors", type=Path, default=ROOT.parent / "shared" / "bench" / "vectors.py")
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; later measurements are skipped")
    args = parser.parse_args()
    begun = time.perf_counter()

    print(
        f"faiss {faiss.__version__}, GPUs {faiss.get_num_gpus()}, CPU threads {faiss.omp_get_max_threads()}"
    )
    if faiss.get_num_gpus() and not args.no_probes:
        probes(128)
    generate = load_generator(args.vectors)
    seconds, base = timed(lambda: generate.vectors(args.n, args.dim, seed=0))
    queries = generate.vectors(args.queries, args.dim, seed=1)
    exact_s, (_, exact) = timed(lambda: faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT))
    exact = exact + 1  # ids are row + 1
    print(f"{args.n:,} x {args.dim}-d vectors in {seconds:.0f}s", end="; ")
    print(f"exact top-10 of {args.queries} queries in {exact_s:.0f}s")

    results: dict[str, dict[str, dict]] = {f: {} for f in args.factories.split(FACTORY_SEP)}
    try:
        for side in args.sides.split(","):  # every GPU figure first: the CPU ones take longest
            for factory in results:
                results[factory][side] = run_one(factory, side, base, queries, exact, args, begun)
    except KeyboardInterrupt:  # timeout -s INT: still print what was measured
        print("interrupted")
    print(f"\n{args.n:,} x {args.dim}-d, {args.queries} queries, top 10\n")
    print(table(results))


def run_one(
    factory: str, side: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray, args, begun: float
) -> dict:
    started = time.perf_counter()
    if args.deadline and started - begun > args.deadline:
        return {"error": "skipped: past --deadline"}
    try:
        row = measure(factory, side == "GPU", base, queries, exact, args)
    except Exception as exc:  # one failing side must not hide the others
        traceback.print_exc()
        row = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120]}"}
    print(f"{factory} {side} ({time.perf_counter() - started:.0f}s): {row}", flush=True)
    return row


if __name__ == "__main__":
    main()
