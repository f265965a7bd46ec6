"""Upserts at scale (issue 17): every key upserted twice, with new bytes, by two jobs at once.

One script, one machine, real workers (redis-server, an ingest, two embed, a search and a
maintenance worker; the local file store). A first job indexes ``--keys`` images from a CSV
(``uri,key``); then two jobs run at the same time, each upserting every key again with bytes of
its own. Whatever order their batches commit in, each key must end with exactly one live id, the
one committed last, and a search by that image must return that key at distance ~0. The checks
run after the upserts, again after a compaction, after Redis lost its state and ``rebuild``
derived it again, and on a backup restored under another name.

    PYTHONPATH=. .venv/bin/python bench/upsert.py --keys 10000 --searches 1000
    PYTHONPATH=. .venv/bin/python bench/upsert.py --keys 60 --searches 20     # smoke

Checks per phase: the collection's live count; every key's lookup (its id's bytes are one of the
two upserts' for that key, read back through the image's stored sha256); ``--searches`` keys
sampled evenly, searched by their winning image (each search embeds the image: the slow part).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MOBILENET_025 = ROOT.parent / "shared" / "data" / "models" / "mobilenet_2_5_224_tf_no_top.h5"

from pupyl_queue import PupylQueue  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402
from pupyl_queue.stack import free_port, start_redis, start_worker, stop  # noqa: E402


def picture(seed: int) -> bytes:
    """A smooth random 96×72 JPEG, distinct per seed (like a photo, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:72, 0:96] / 96.0
    channels = [
        np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6))
        + np.cos(yy * rng.uniform(2, 9) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    pixels = ((np.stack(channels, axis=-1) + 2) * 63.75).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_version(folder: Path, keys: list[str], version: int) -> tuple[Path, dict[str, str]]:
    """Images of one version of every key, and the CSV listing them; the sha256 of each key's bytes."""
    images = folder / f"v{version}"
    images.mkdir(parents=True)
    lines, shas = ["uri,key"], {}
    for n, key in enumerate(keys):
        data = picture(version * 10_000_000 + n)
        path = images / f"{n:06d}.jpg"
        path.write_bytes(data)
        lines.append(f"{path},{key}")
        shas[key] = hashlib.sha256(data).hexdigest()
    listing = folder / f"v{version}.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing, shas


def check(
    client: PupylQueue,
    keys: list[str],
    versions: dict[int, dict[str, str]],
    folder: Path,
    searches: int,
    phase: str,
) -> dict[str, Any]:
    """Live count, every key's winner (one of the two upserts), and searches by winning images."""
    started = time.perf_counter()
    count = int(client.search_async(np.ones(256, np.float32), top=1).get(timeout=600)["count"])
    winners: dict[str, int] = {}
    wrong, ids = [], set()
    for key in keys:
        found = client.lookup(key)
        if found is None:
            wrong.append(key)
            continue
        ids.add(int(found["id"]))
        version = next((v for v in (2, 3) if versions[v][key] == found["sha256"]), None)
        if version is None:
            wrong.append(key)
        else:
            winners[key] = version
    step = max(1, len(keys) // max(1, searches))
    sample = keys[::step][:searches]
    found_self, worst, latencies = 0, 0.0, []
    for key in sample:
        if key not in winners:
            continue
        n = keys.index(key)
        t0 = time.perf_counter()
        hits = client.search(folder / f"v{winners[key]}" / f"{n:06d}.jpg", top=1, return_metadata=True)
        latencies.append(time.perf_counter() - t0)
        if hits and hits[0].get("key") == key:
            found_self += 1
            worst = max(worst, float(hits[0]["distance"]))
    row = {
        "phase": phase,
        "live": count,
        "keys_with_one_upsert_winner": len(winners),
        "distinct_ids": len(ids),
        "wrong": len(wrong),
        "won_by_job_2": sum(1 for v in winners.values() if v == 2),
        "searched": len(sample),
        "found_own_key": found_self,
        "largest_distance": worst,
        "search_p50_ms": 1000 * float(np.median(latencies)) if latencies else float("nan"),
        "check_s": time.perf_counter() - started,
    }
    print(
        f"  {phase}: {count} live, {len(winners)}/{len(keys)} keys name one of their two upserts "
        f"({row['won_by_job_2']} won by job 2), {len(ids)} distinct ids, {len(wrong)} wrong; "
        f"{found_self}/{len(sample)} searches found their key (largest distance {worst:.1e}, "
        f"p50 {row['search_p50_ms']:.0f} ms); {row['check_s']:.0f} s"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--searches", type=int, default=1000, help="searches by image per phase")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    from pupyl_queue.models import wrap_mobilenet

    work = Path(tempfile.mkdtemp(prefix="pupyl-upsert-"))
    os.environ["KERAS_HOME"] = str(work / "keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    weights = MOBILENET_025 if MOBILENET_025.exists() else None
    model = wrap_mobilenet(weights, work / "mobilenet025.keras", alpha=0.25)
    keys = [f"sku-{n:06d}" for n in range(args.keys)]
    started = time.perf_counter()
    v1, _ = write_version(work, keys, 1)
    v2, shas2 = write_version(work, keys, 2)
    v3, shas3 = write_version(work, keys, 3)
    print(f"{3 * args.keys} images written in {time.perf_counter() - started:.0f} s")

    port = free_port()
    redis = start_redis(work / "redis", port, appendonly=False)
    settings = Settings(
        data_dir=work / "data", redis_url=f"redis://127.0.0.1:{port}/0", batch_size=args.batch_size
    )
    queues = ("ingest", "embed", "embed", "search", "maintenance")
    workers = [start_worker(q, settings, log_path=work / f"{q}-{n}.log") for n, q in enumerate(queues)]
    client = PupylQueue(settings=settings, model=model)
    rows = []
    try:
        t0 = time.perf_counter()
        first = client.index(v1).wait(timeout=7200)
        print(f"first job: {first['indexed']} indexed in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        jobs = [client.index(v2), client.index(v3)]  # at once: their batches interleave
        states = [job.wait(timeout=7200) for job in jobs]
        print(
            f"two concurrent upsert jobs: {[s['indexed'] for s in states]} indexed, "
            f"{[s.get('failed', 0) for s in states]} failed, in {time.perf_counter() - t0:.0f} s"
        )
        versions = {2: shas2, 3: shas3}
        rows.append(check(client, keys, versions, work, args.searches, "after the upserts"))
        client.compact(timeout=3600)
        rows.append(check(client, keys, versions, work, args.searches, "after a compaction"))

        from pupyl_queue.rebuild import rebuild

        client.redis.flushdb()  # Redis lost everything: queues, results, keys, coordination
        report = rebuild(client.store, client.redis, client.collection)
        print(f"rebuild: {report.get('keys')} keys, {report.get('key_conflicts')} conflicts")
        deadline = time.monotonic() + 300
        while True:  # the search worker notices the lost state and loads again
            try:
                rows.append(check(client, keys, versions, work, args.searches, "after rebuild"))
                break
            except Exception as exc:  # noqa: BLE001 - reported, retried until the deadline
                if time.monotonic() > deadline:
                    raise
                print(f"  (search worker not ready: {exc})")
                time.sleep(2)

        archive = work / "backup.tar"
        client.backup(archive)
        client.restore(archive, as_name="restored")
        rows.append(check(client.for_collection("restored"), keys, versions, work, args.searches, "restored"))
    finally:
        client.close()
        for proc in [*workers, redis]:
            stop(proc)
    print(
        f"\n{args.keys:,} keys, each upserted twice at once by two jobs; {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}"
    )
    print("| phase | live ids | keys naming one of their upserts | wrong | searches finding their key |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['live']:,} | {r['keys_with_one_upsert_winner']:,} | {r['wrong']} | "
            f"{r['found_own_key']}/{r['searched']} (max distance {r['largest_distance']:.1e}) |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
