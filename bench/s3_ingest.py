"""Indexing an s3:// prefix: S3 requests per image and CPU per image, by name (references) or by bytes.

    PYTHONPATH=. .venv/bin/python bench/s3_ingest.py --photos /tmp/photos3k [--images 500] [--rounds 2]

The whole system (redis-server, an ingest and an embed worker with its decode processes, the null
extractor) indexes photos from an S3 bucket into a collection kept in S3, both on one moto_server,
twice per round: with ``PUPYL_S3_REFERENCES=false`` (the ingest worker reads each object, one after
another, and stages those that do not fit in the message in the store) and ``true`` (the default:
the embed worker's decode processes read the objects by name). ``--variants uploads`` indexes the
same photos as uploads (``PupylQueue.index_uploads``, the API's path; their PUTs counted too).
moto_server logs every request it serves: the requests of each timed job are counted from its log,
by method. On this 2-core machine the server's own CPU (moto, ~4 ms a request) weighs on the wall
time; the counts and the workers' CPU per image do not depend on it. To compare two checkouts, run
each checkout's own copy of this file from its folder: the workers import the code of the folder
they start in, this process the code of the checkout this file is in.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.ingest; the workers import the checkout of their folder

from bench.ingest import CpuSeconds, create_collection  # noqa: E402
from pupyl_queue import PupylQueue  # noqa: E402
from pupyl_queue.models import ModelSpec  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402
from pupyl_queue.stack import free_port, start_redis, start_worker, stop, wait_for_port  # noqa: E402
from pupyl_queue.store import S3Store  # noqa: E402

REQUEST = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP')


def requests_in(log: Path, start: int) -> tuple[collections.Counter[str], int]:
    """The requests moto_server logged past byte ``start`` of its log, by method and kind."""
    text = log.read_bytes()[start:].decode(errors="replace")
    counts: collections.Counter[str] = collections.Counter()
    for method, path in REQUEST.findall(text):
        kind = "source" if path.startswith("/bench-src") else "store"
        counts[f"{method} {kind}"] += 1
    return counts, len(text.encode())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default="../shared/data/photos")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--variants",
        default="bytes,references",
        help="comma-separated: bytes (PUPYL_S3_REFERENCES=false), references (true), uploads (index_uploads)",
    )
    args = parser.parse_args()
    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    files = files[: args.images]

    with tempfile.TemporaryDirectory(prefix="pupyl-s3-ingest-") as tmp:
        work = Path(tmp)
        moto_port, redis_port = free_port(), free_port()
        moto_log = work / "moto.log"
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=open(moto_log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        redis = start_redis(work / "redis", redis_port, appendonly=False)
        try:
            wait_for_port(moto_port, moto, what="moto_server")
            endpoint = f"127.0.0.1:{moto_port}"
            keys = {"s3_access_key": "bench", "s3_secret_key": "bench-secret", "s3_secure": False}
            source = S3Store("bench-src", "", endpoint, keys["s3_access_key"], keys["s3_secret_key"], False)
            for n, path in enumerate(files):
                source.put(f"photos/{n:06d}.jpg", path.read_bytes())
            for n, path in enumerate(files[:32]):
                source.put(f"warm/{n:06d}.jpg", path.read_bytes())
            mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
            print(
                f"{len(files)} photos ({mean_kb:.0f} KB on average) in s3://bench-src/photos/, batches of "
                f"{args.batch_size}, null extractor, store s3://bench-store/ on the same moto_server"
            )
            rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
            for round_ in range(args.rounds):
                for number, variant in enumerate(args.variants.split(",")):
                    references = variant != "bytes"
                    name = (
                        "uploads"
                        if variant == "uploads"
                        else f"PUPYL_S3_REFERENCES={str(references).lower()}"
                    )
                    settings = Settings(
                        store=f"s3://bench-store/r{round_}-{variant}",
                        s3_endpoint=endpoint,
                        redis_url=f"redis://127.0.0.1:{redis_port}/{round_ * 3 + number}",
                        data_dir=work / f"data-{round_}-{variant}",
                        batch_size=args.batch_size,
                        s3_references=references,
                        **keys,
                    )
                    ingest = start_worker("ingest", settings, log_path=work / "ingest.log")
                    embed = start_worker("embed", settings, log_path=work / "embed.log")
                    try:
                        client = PupylQueue(settings=settings, collection="bench")
                        create_collection(client, ModelSpec.null())
                        client.index("s3://bench-src/warm/").wait(timeout=600)
                        cpu = CpuSeconds(ingest.pid, embed.pid, redis.pid)
                        _, offset = requests_in(moto_log, 0)
                        before = cpu.read()
                        started = time.perf_counter()
                        if variant == "uploads":  # the client's PUT of each upload is counted too
                            uploads = [(p.name, p.read_bytes()) for p in files]
                            job = client.index_uploads(uploads)
                        else:
                            job = client.index("s3://bench-src/photos/")
                        state = job.wait(timeout=1800, poll=0.05)
                        elapsed = time.perf_counter() - started
                        after = cpu.read()
                        time.sleep(1.0)  # the batches' last deletes reach the log
                        counts, _ = requests_in(moto_log, offset)
                        client.close()
                    finally:
                        stop(ingest)
                        stop(embed)
                    assert state["indexed"] == len(files), state
                    n = len(files)
                    spent = {
                        k.removeprefix("cpu_").removesuffix("_s") + " ms": after[k] - before[k] for k in after
                    }
                    row = {
                        "img/s": n / elapsed,
                        **{k: v / n for k, v in counts.items()},
                        "requests": sum(counts.values()) / n,
                        **{k: v * 1000 / n for k, v in spent.items()},
                    }
                    rows[name].append(row)
                    print(f"round {round_}, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
        finally:
            stop(redis)
            moto.kill()
    columns = sorted({k for runs in rows.values() for r in runs for k in r}, key=lambda k: (k != "img/s", k))
    print(f"\nmedians of {args.rounds} rounds, per image (requests: moto_server's log of the timed job)")
    print("| run | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, runs in rows.items():
        cells = [f"{statistics.median(r.get(c, 0.0) for r in runs):.2f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="pupyl-keras-"))
    main()
