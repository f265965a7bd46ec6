"""Search latency under ingest load, next to idle, and worker memory over a long run.

One script, one machine: a redis-server, one worker of each kind (started as ``pupyl-queue up``
starts them) and a local store. A seed job indexes ``--seed`` photos. Then:

1. idle: one client searches by image ``--searches`` times, nothing else running;
2. loaded: ``--producers`` processes each enqueue ``--jobs`` bulk jobs of ``--per-job`` photos
   (fire and forget, all at once) while the same client keeps searching until every job is done.

Searches go to the ``search`` queue, ingestion to ``ingest``/``embed``: they never share a queue, so
what rises under load is CPU contention on this machine, not waiting behind ingestion. Resident
memory (RSS) of every worker is sampled each second; the table shows start, peak and end.

    python bench/load.py                     # the figures in BENCHMARKS.md
    python bench/load.py --seed 60 --per-job 40 --jobs 1 --searches 20   # a quick smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import photo_set, write_weights  # noqa: E402
from pupyl_queue import constants as C  # noqa: E402
from pupyl_queue.characteristics import Characteristic  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def produce(settings: Settings, folders: list[str], collection: str, out: multiprocessing.Queue) -> None:
    """One producer process: enqueue its jobs at once, report their ids."""
    from pupyl_queue import PupylQueue

    client = PupylQueue(settings=settings, collection=collection)
    out.put([client.index(folder).id for folder in folders])
    client.close()


class Sampler(threading.Thread):
    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, pid in self.pids.items():
                self.samples[name].append(rss_mib(pid))
            self.stop.wait(1.0)


def searches_until(client, queries: list[Path], done: threading.Event | None, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Latencies (ms) of searches by image, round-robin over queries, until ``done`` or ``count``."""
    latencies: list[float] = []
    n = 0
    while (done is None and n < count) or (done is not None and not done.is_set()):
        started = time.perf_counter()
        client.search(queries[n % len(queries)], top=10)
        latencies.append((time.perf_counter() - started) * 1000)
        n += 1
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=500, help="photos indexed before measuring")
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="jobs per producer")
    parser.add_argument("--per-job", type=int, default=300, help="photos per job")
    parser.add_argument("--searches", type=int, default=200, help="searches of the idle phase")
    parser.add_argument("--network-nice", type=int, default=None, help="PUPYL_NETWORK_NICE of the run")
    args = parser.parse_args()

    from pupyl_queue import PupylQueue
    from pupyl_queue.stack import free_port, start_redis, start_worker, stop

    work = Path(tempfile.mkdtemp(prefix="pupyl-load-"))
    os.environ["KERAS_HOME"] = str(work / "keras")
    characteristic = Characteristic.MINIMUMWEIGHT_FAST_SMALL_PRECISION
    weights = write_weights(characteristic, work / "keras")
    jobs = args.producers * args.jobs
    files = photo_set(args.seed + jobs * args.per_job, work / "all")
    seed_dir = work / "seed"
    seed_dir.mkdir()
    for path in files[: args.seed]:
        path.rename(seed_dir / path.name)
    job_dirs = []
    rest = files[args.seed :]
    for j in range(jobs):
        folder = work / f"job{j}"
        folder.mkdir()
        for path in rest[j * args.per_job : (j + 1) * args.per_job]:
            path.rename(folder / path.name)
        job_dirs.append(str(folder))

    port = free_port()
    redis = start_redis(work / "redis", port, appendonly=False)
    settings = Settings(
        data_dir=work / "data",
        redis_url=f"redis://127.0.0.1:{port}/0",
        weights=str(weights),
        characteristic=characteristic,
        **({} if args.network_nice is None else {"network_nice": args.network_nice}),
    )
    workers = {q: start_worker(q, settings, log_path=work / f"{q}.log") for q in C.QUEUES}
    sampler = Sampler({q: p.pid for q, p in workers.items()})
    client = PupylQueue(settings=settings, collection="load")
    try:
        started = time.perf_counter()
        client.index(seed_dir).wait(timeout=3600)
        print(f"seed job: {args.seed} photos in {time.perf_counter() - started:.1f}s")
        queries = sorted(seed_dir.iterdir())[:50]
        searches_until(client, queries, None, 10)  # warm: model and index loaded
        sampler.start()

        idle = searches_until(client, queries, None, args.searches)

        ctx = multiprocessing.get_context("spawn")
        ids = ctx.Queue()
        producers = [
            ctx.Process(target=produce, args=(settings, job_dirs[p :: args.producers], "load", ids))
            for p in range(args.producers)
        ]
        done = threading.Event()
        loaded: list[float] = []
        searcher = threading.Thread(target=lambda: loaded.extend(searches_until(client, queries, done, 0)))
        started = time.perf_counter()
        for proc in producers:
            proc.start()
        searcher.start()
        job_ids = [job_id for _ in producers for job_id in ids.get(timeout=600)]
        for proc in producers:
            proc.join()
        for job_id in job_ids:
            state = client.job(job_id).wait(timeout=3600)
            assert state["state"] == "done" and state["indexed"] == args.per_job, state
        ingest_s = time.perf_counter() - started
        done.set()
        searcher.join()
        sampler.stop.set()
        count = client.search(queries[0], top=1, return_metadata=False)
        assert count, "the collection answers after the load"
    finally:
        client.close()
        for proc in workers.values():
            stop(proc)
        stop(redis)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; MobileNet "
        f"(characteristic 1), collection of {args.seed} photos growing to {args.seed + jobs * args.per_job}; "
        f"{args.producers} producers x {args.jobs} jobs x {args.per_job} photos, fire and forget; "
        f"ingest {jobs * args.per_job / ingest_s:.1f} img/s while searching\n"
    )
    print("| phase | searches | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, values in (("idle", idle), ("under ingest", loaded)):
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | {percentile(values, 99):.1f} | "
            f"{max(values):.1f} |"
        )
    print("\n| worker | RSS start MiB | peak MiB | end MiB |")
    print("|---|---|---|---|")
    for name, values in sampler.samples.items():
        print(f"| {name} | {values[0]:.0f} | {max(values):.0f} | {values[-1]:.0f} |")


if __name__ == "__main__":
    main()
