"""The index at scale: build, memory, latency, recall and visibility, against pupyl's Annoy rebuild.

Synthetic CNN-like vectors (../shared/bench/vectors.py, calibrated on real
MobileNet features) are committed as segments into a real store and Redis,
compacted into a snapshot (the index type chosen by size), and searched in
process and end to end through a real Celery search worker.

    .venv/bin/python bench/index_scale.py --sizes 100000,1000000 --pupyl-python /tmp/pupylvenv/bin/python
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VECTORS = ROOT.parent / "shared" / "bench" / "vectors.py"

from pupyl_queue.codecs import encode_segment  # noqa: E402
from pupyl_queue.compaction import Compactor  # noqa: E402
from pupyl_queue.coordination import Coordinator, connect  # noqa: E402
from pupyl_queue.layout import Layout  # noqa: E402
from pupyl_queue.models import ModelSpec  # noqa: E402
from pupyl_queue.searcher import Searcher  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402
from pupyl_queue.store import LocalStore  # noqa: E402

SEGMENT_ROWS = 20_000
ANNOY_SCRIPT = """
import sys, time, numpy as np
from annoy import AnnoyIndex
x = np.load(sys.argv[1], mmap_mode="r")
started = time.perf_counter()
index = AnnoyIndex(x.shape[1], "angular")
for i, v in enumerate(x):
    index.add_item(i, v)
index.build(int(sys.argv[2]))
print(time.perf_counter() - started)
"""


def generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_vectors", VECTORS)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def vectors_and_truth(
    n: int, dim: int, queries: int, k: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` CNN-like vectors, ``queries`` more, and each query's exact top ``k`` among the ``n``."""
    import faiss

    gen = generator()
    x, q = gen.vectors(n, dim, seed=0), gen.vectors(queries, dim, seed=1)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    return x, q, exact.search(q, k)[1]


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def store_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_size(
    n: int, dim: int, work: Path, settings: Settings, queries: np.ndarray, args: argparse.Namespace
) -> dict:
    from pupyl_queue import PupylQueue
    from pupyl_queue.stack import start_worker, stop

    gen = generator()
    collection = f"n{n}"
    layout = Layout(collection)
    store = LocalStore(work / "store")
    coord = Coordinator(connect(settings.broker_url), layout)
    # A collection of `dim`-d vectors; vector queries never build its network.
    spec = ModelSpec.for_characteristic(1) if dim == 1024 else ModelSpec("keras", dim, 224, sha256="bench")
    manifest = {"schema": 1, "collection": collection, "model": spec.to_json(), "created_at": time.time()}
    store.put(layout.manifest, json.dumps(manifest).encode())
    # exact top-10 by brute force, chunk by chunk, for recall
    best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 10), dtype=np.int64)
    next_id = 1
    for chunk in gen.iter_vectors(n, dim, seed=0, chunk=SEGMENT_ROWS):
        ids = np.arange(next_id, next_id + len(chunk), dtype=np.int64)
        next_id += len(chunk)
        key = layout.segment(f"bench-{ids[0]:012d}")
        store.put(key, encode_segment(ids, chunk))
        coord.publish(key)
        sims = queries @ chunk.T
        merged = np.concatenate([best, sims], axis=1)
        merged_ids = np.concatenate([best_ids, np.broadcast_to(ids, sims.shape)], axis=1)
        order = np.argsort(-merged, axis=1)[:, :10]
        best = np.take_along_axis(merged, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    exact_top = list(best_ids)
    coord.r.set(layout.key("ids"), next_id)
    segments_gb = store_gb(work / "store")
    started = time.perf_counter()
    manifest = Compactor(store, coord, settings).run({"metric": "cosine", "dim": dim})
    build_s = time.perf_counter() - started
    compaction_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    snapshot_gb = store_gb(work / "store") - segments_gb
    print(f"  compaction {build_s:.0f} s, {manifest['factory']}, store +{snapshot_gb:.2f} GB", flush=True)

    searcher = Searcher(store, coord, layout, settings.index_nprobe)
    searcher.load()
    inproc = []
    found = []
    for q in queries:
        t = time.perf_counter()
        found.append(searcher.search(q, 10))
        inproc.append((time.perf_counter() - t) * 1000)
    recall = float(np.mean([len({i for i, _ in f} & set(e.tolist())) / 10 for f, e in zip(found, exact_top)]))
    sweep = {}
    for nprobe in (int(v) for v in args.nprobe_sweep.split(",") if v):
        searcher.index.set_nprobe(nprobe)  # type: ignore[union-attr]
        times, hits = [], []
        for q, e in zip(queries, exact_top):
            t = time.perf_counter()
            got = searcher.search(q, 10)
            times.append((time.perf_counter() - t) * 1000)
            hits.append(len({i for i, _ in got} & set(e.tolist())) / 10)
        sweep[nprobe] = {"p50_ms": statistics.median(times), "recall_at_10": float(np.mean(hits))}
        row = sweep[nprobe]
        print(f"  nprobe {nprobe:>4}: p50 {row['p50_ms']:.2f} ms, recall@10 {row['recall_at_10']:.3f}")
    searcher.index.set_nprobe(settings.index_nprobe)  # type: ignore[union-attr]
    nprobe_used = searcher.index.nprobe  # type: ignore[union-attr]
    del searcher  # the worker below loads its own copy: two 10 GB indexes would not fit in 24 GB
    gc.collect()

    # Through Celery and Redis: a real search worker process holding the snapshot.
    worker = start_worker("search", settings, log_path=work / f"search-{n}.log")
    try:
        client = PupylQueue(settings=settings, collection=collection)
        client.search_async(queries[0], top=10).get(timeout=1800)  # waits for the worker's load
        e2e = []
        for q in queries[: args.e2e_queries]:
            t = time.perf_counter()
            client.search_async(q, top=10).get(timeout=60)
            e2e.append((time.perf_counter() - t) * 1000)
        memory = rss_mib(worker.pid)
        # Visibility: commit one new vector, time until a search through Celery returns it.
        fresh = gen.vectors(1, dim, seed=99)
        key = layout.segment("bench-visibility")
        store.put(key, encode_segment(np.array([next_id]), fresh))
        t = time.perf_counter()
        coord.publish(key)
        while client.search_async(fresh[0], top=1).get(timeout=60)["results"][0]["id"] != next_id:
            pass
        visible_ms = (time.perf_counter() - t) * 1000
    finally:
        stop(worker)
    p50, p99 = percentiles(inproc)
    e50, e99 = percentiles(e2e)
    return {
        "n": n,
        "factory": manifest["factory"],
        "nprobe": nprobe_used,
        "build_s": build_s,
        "compaction_peak_rss_mib": compaction_peak_mib,
        "segments_gb": segments_gb,
        "snapshot_gb": snapshot_gb,
        "reused_vector_files": manifest.get("reused_vector_files", 0),
        "memory_budget_gb": settings.index_memory_gb,
        "search_worker_rss_mib": memory,
        "inproc_p50_ms": p50,
        "inproc_p99_ms": p99,
        "e2e_p50_ms": e50,
        "e2e_p99_ms": e99,
        "recall_at_10": recall,
        "visible_ms": visible_ms,
    }


def annoy_append(python: str, n: int, dim: int, work: Path, trees: int) -> float:
    """pupyl's approach: the whole Annoy index rebuilt for an append, timed at size ``n``."""
    path = work / f"annoy-{n}.npy"
    np.save(path, generator().vectors(n, dim, seed=0))
    out = subprocess.run([python, "-c", ANNOY_SCRIPT, str(path), str(trees)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    path.unlink()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--e2e-queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=0, help="0: the default, max(64, nlist/32)")
    parser.add_argument(
        "--memory-gb", type=float, default=Settings().index_memory_gb, help="PUPYL_INDEX_MEMORY_GB"
    )
    parser.add_argument(
        "--nprobe-sweep", default="32,64,128,256", help="in-process recall/latency per nprobe"
    )
    parser.add_argument("--pupyl-python", default="", help="a python with annoy (pupyl's venv)")
    parser.add_argument("--annoy-trees", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not VECTORS.exists():
        raise SystemExit(f"{VECTORS} is missing: the benchmark needs the calibrated vector generator")
    from pupyl_queue.stack import free_port, start_redis, stop

    work = Path(tempfile.mkdtemp(prefix="pupyl-index-"))
    port = free_port()
    redis = start_redis(work / "redis", port, appendonly=False)
    settings = Settings(
        data_dir=work,
        redis_url=f"redis://127.0.0.1:{port}/0",
        store=(work / "store").as_uri(),
        index_nprobe=args.nprobe,
        index_memory_gb=args.memory_gb,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    queries = generator().vectors(args.queries, args.dim, seed=1)
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(n, args.dim, work, settings, queries, args))
            print(json.dumps(rows[-1]), flush=True)
        annoy = (
            annoy_append(args.pupyl_python, 100_000, args.dim, work, args.annoy_trees)
            if args.pupyl_python
            else None
        )
    finally:
        stop(redis)
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of segments at 10M
    print(
        f"\n{args.dim}-d synthetic CNN-like vectors, {args.queries} queries ({args.e2e_queries} end to end), "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'vectors':>10} {'index':>16} {'nprobe':>6} {'build s':>8} {'RSS MiB':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} "
        f"{'e2e p50':>8} {'e2e p99':>8} {'recall@10':>10} {'visible ms':>11}"
    )
    for r in rows:
        print(
            f"{r['n']:>10} {r['factory']:>16} {r['nprobe'] or '-':>6} {r['build_s']:>8.1f} "
            f"{r['search_worker_rss_mib']:>8.0f} "
            f"{r['inproc_p50_ms']:>7.2f} {r['inproc_p99_ms']:>7.2f} "
            f"{r['e2e_p50_ms']:>8.2f} {r['e2e_p99_ms']:>8.2f} "
            f"{r['recall_at_10']:>10.3f} {r['visible_ms']:>11.0f}"
        )
    if annoy is not None:
        incremental = next((r for r in rows if r["n"] == 100_000), None)
        print(
            f"\nappend one image at 100k: pupyl (Annoy, {args.annoy_trees} trees, rebuilt) {annoy:.1f} s; "
            f"pupyl-queue: one segment commit, visible in "
            f"{incremental['visible_ms']:.0f} ms"
            if incremental
            else ""
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "annoy_rebuild_s": annoy}, indent=2))


if __name__ == "__main__":
    main()
