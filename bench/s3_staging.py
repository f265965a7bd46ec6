"""The ingest's staged copies to S3: each put in line against the staging threads, one process.

    taskset -c 1 s3rver -d /tmp/s3d -a 127.0.0.1 -p 45999 --configure-bucket bench-copies --silent &
    PYTHONPATH=. .venv/bin/python bench/s3_staging.py --photos /tmp/photos3k --endpoint 127.0.0.1:45999

``ingest.expand_job`` (the real code, in this process, pinned to the first core; a real
redis-server) expands a folder of photos with ``PUPYL_INLINE_ITEM_BYTES=0``, so every image is
staged in the store, as the large images of a URL list or of uploads are; the S3 server is
given (``--endpoint``, its bucket ``--bucket`` made already). Alternately, round by round: the
puts in line (``S3Store.remote`` set false for the run: what the ingest did before) and through
the process's threads (now). Prints wall and CPU ms per image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from pupyl_queue.ingest import expand_job
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.stack import free_port, start_redis, stop
from pupyl_queue.store import S3Store


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default="../shared/data/photos")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoint", required=True, help="an S3 server host:port")
    parser.add_argument("--bucket", default="bench-copies")
    parser.add_argument("--access-key", default="S3RVER")
    parser.add_argument("--secret-key", default="S3RVER")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    with tempfile.TemporaryDirectory(prefix="pupyl-s3-staging-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for path in files[: args.images]:
            shutil.copyfile(path, folder / path.name)
        count = len(list(folder.iterdir()))
        port = free_port()
        redis = start_redis(Path(tmp) / "redis", port, appendonly=False)
        results: dict[str, list[tuple[float, float]]] = {"in line (before)": [], "threads (now)": []}
        try:
            for round_ in range(args.rounds):
                for name in results:
                    S3Store.remote = name.startswith("threads")
                    settings = Settings(
                        store=f"s3://{args.bucket}/staging-{uuid.uuid4().hex[:8]}",
                        s3_endpoint=args.endpoint,
                        s3_access_key=args.access_key,
                        s3_secret_key=args.secret_key,
                        s3_secure=False,
                        redis_url=f"redis://127.0.0.1:{port}/0",
                        data_dir=Path(tmp) / "data",
                        batch_size=64,
                        inline_item_bytes=0,
                    )
                    rt = Runtime(settings)
                    job_id = uuid.uuid4().hex
                    rt.coordinator("default").create_job(job_id, {"collection": "default"})
                    sent: list[object] = []
                    started, cpu = time.perf_counter(), time.process_time()
                    request = {
                        "job_id": job_id,
                        "collection": "default",
                        "uri": str(folder),
                        "origin": "local",
                    }
                    expand_job(rt, request, sent.append)  # type: ignore[arg-type]
                    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                    per = (wall * 1000 / count, cpu * 1000 / count)
                    results[name].append(per)
                    print(f"round {round_}, {name}: wall {per[0]:.2f} ms, CPU {per[1]:.2f} ms")
        finally:
            stop(redis)
    print(f"\n{count} photos, every one staged; medians of {args.rounds} rounds, per image")
    print("| puts | wall ms | ingest CPU ms |\n|---|---|---|")
    for name, rows in results.items():
        wall, cpu = (statistics.median(r[n] for r in rows) for n in (0, 1))
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
