"""CPU per 60 KB PUT and GET of two Python S3 clients: minio-py (the store's) and obstore (Rust).

    pip install obstore   # not a dependency of pupyl-queue: this measures whether it should be
    python bench/s3_clients.py --endpoint 127.0.0.1:45999 --photos /tmp/photos3k

Why: each image costs a decode process one PUT (its stored copy) and, for an s3:// source, one GET;
with minio-py that is ~1 ms of CPU per request against ~4 ms of decode (BENCHMARKS.md, session 18).
Both clients write and read the same photos to the same server (given: s3rver or MinIO, its bucket
made), alternately, 3 rounds; this process's CPU (all its threads, obstore's runtime included).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", default="bench-copies")
    parser.add_argument("--access-key", default="S3RVER")
    parser.add_argument("--secret-key", default="S3RVER")
    parser.add_argument("--photos", default="../shared/data/photos")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    import obstore
    from minio import Minio
    from obstore.store import S3Store

    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    datas = [p.read_bytes() for p in files[: args.images]]
    minio = Minio(args.endpoint, access_key=args.access_key, secret_key=args.secret_key, secure=False)
    rust = S3Store(
        args.bucket,
        endpoint=f"http://{args.endpoint}",
        access_key_id=args.access_key,
        secret_access_key=args.secret_key,
        region="us-east-1",
        client_options={"allow_http": True},
    )

    def minio_get(n: int, _: bytes) -> None:
        response = minio.get_object(args.bucket, f"minio/{n}")
        try:
            assert len(response.read()) == len(datas[n])
        finally:
            response.close()
            response.release_conn()

    def rust_get(n: int, _: bytes) -> None:
        assert len(bytes(obstore.get(rust, f"obstore/{n}").bytes())) == len(datas[n])

    ops = {
        "minio-py PUT": lambda n, d: minio.put_object(args.bucket, f"minio/{n}", io.BytesIO(d), len(d)),
        "obstore PUT": lambda n, d: obstore.put(rust, f"obstore/{n}", d),
        "minio-py GET": minio_get,
        "obstore GET": rust_get,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ops}
    for _ in range(3):
        for name, op in ops.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for n, data in enumerate(datas):
                op(n, data)
            results[name].append(
                (
                    (time.process_time() - cpu) * 1000 / len(datas),
                    (time.perf_counter() - wall) * 1000 / len(datas),
                )
            )
    kb = sum(map(len, datas)) / len(datas) / 1024
    print(f"{len(datas)} photos, {kb:.0f} KB on average, medians of 3 rounds, per request")
    print("| request | client CPU ms | wall ms |\n|---|---|---|")
    for name, rows in results.items():
        cpu, wall = (statistics.median(r[n] for r in rows) for n in (0, 1))
        print(f"| {name} | {cpu:.3f} | {wall:.3f} |")


if __name__ == "__main__":
    main()
