"""Store operations and Redis round trips per indexed image (issue #15), counted, not timed.

One job of 480 images runs in this process (expansion, then each embed batch) against a real
redis-server and the local store, with the null extractor (no network: the counts do not depend
on it) and GPU-sized batches (PUPYL_BATCH_SIZE=256, PUPYL_INFER_BATCH=128 as a GPU worker
takes by default): its batches ramp up 32, 64, 128, 256. Printed: what the 256-image batch's
embed task did, per image, and what the expansion did per image, for each way an item travels
in the embed message:

- inline: the bytes inside the message (images up to PUPYL_INLINE_ITEM_BYTES, at most
  PUPYL_INLINE_BATCH_BYTES per message);
- staged: through the store (PUPYL_INLINE_ITEM_BYTES=0: a put by the ingest worker, a get and a
  delete by the embed worker);
- paths: a local file's path (PUPYL_LOCAL_REFERENCES, where the checkout has it).

    PYTHONPATH=. .venv/bin/python bench/roundtrips.py [--images-per-batch 256] [--infer-batch 128]

The counting store and Redis connection are tests/counting.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_mode(mode: str, size: int, infer: int, work: Path, folder: Path, redis_url: str) -> dict[str, Any]:
    from pupyl_queue import constants as C
    from pupyl_queue.embedding import embed_batch
    from pupyl_queue.ingest import expand_job
    from pupyl_queue.layout import Layout
    from pupyl_queue.models import ModelSpec
    from pupyl_queue.runtime import Runtime
    from pupyl_queue.settings import Settings
    from tests.counting import CountingStore, count_redis

    options: dict[str, Any] = {
        "inline": {},
        "staged": {"inline_item_bytes": 0},
        "paths": {"local_references": True},
    }[mode]
    settings = Settings(
        data_dir=work / mode,
        redis_url=redis_url,
        batch_size=size,
        infer_batch=infer,
        decode_processes=0,
        **options,
    )
    rt = Runtime(settings)
    store = CountingStore(work / mode / "store")
    client, trips = count_redis(redis_url)
    client.flushdb()
    rt.__dict__["store"], rt.__dict__["redis"] = store, client
    collection = f"rt-{mode}"
    layout = Layout(collection)
    spec = ModelSpec.null()
    client.set(layout.key("model"), json.dumps(spec.to_json(), sort_keys=True))
    manifest = {"schema": C.SCHEMA_VERSION, "collection": collection, "model": spec.to_json()}
    store.put(layout.manifest, json.dumps({**manifest, "created_at": time.time()}).encode())
    trips.name_scripts(rt.coordinator(collection))

    job_id = f"bench{mode}"
    rt.coordinator(collection).create_job(job_id, {"collection": collection})
    batches: list[dict[str, Any]] = []
    store.ops.clear()
    trips.clear()
    expand_job(
        rt,
        {"job_id": job_id, "collection": collection, "uri": str(folder), "origin": "local"},
        batches.append,
    )
    total = sum(len(b["items"]) for b in batches)
    expansion = (Counter(store.ops), len(trips.log), total)
    message_bytes = [len(json.dumps(b)) for b in batches]
    for batch in batches[:-1]:
        embed_batch(rt, batch)  # loads the scripts
    store.ops.clear()
    trips.clear()
    last = batches[-1]
    result = embed_batch(rt, last)
    n = len(last["items"])
    assert result["indexed"] == n, result
    return {
        "mode": mode,
        "n": n,
        "embed_ops": Counter(store.ops),
        "embed_trips": list(trips.log),
        "expansion": expansion,
        "message_bytes": message_bytes[-1],
    }


def report(row: dict[str, Any]) -> None:
    n, ops = row["n"], row["embed_ops"]
    exp_ops, exp_trips, total = row["expansion"]
    puts = sum(v for (op, _), v in ops.items() if op == "put")
    gets = sum(v for (op, _), v in ops.items() if op == "get")
    dels = sum(v for (op, _), v in ops.items() if op == "delete")
    other = sum(v for (op, _), v in ops.items() if op not in ("put", "get", "delete"))
    exp_puts = sum(v for (op, _), v in exp_ops.items() if op == "put")
    trips = row["embed_trips"]
    kinds = Counter(names[0] for names in trips)
    print(f"\n== {row['mode']}: embed task of {n} images (message {row['message_bytes'] / 1024:.0f} KiB)")
    print(
        f"store: {puts} puts ({puts / n:.3f}/image), {gets} gets ({gets / n:.3f}/image), "
        f"{dels} deletes ({dels / n:.3f}/image), {other} other; "
        f"all {(puts + gets + dels + other) / n:.3f}/image"
    )
    print("  by folder: " + ", ".join(f"{op} {folder} {v}" for (op, folder), v in sorted(ops.items())))
    print(
        f"redis: {len(trips)} round trips ({len(trips) / n:.3f}/image): "
        + ", ".join(f"{k} {v}" for k, v in kinds.items())
    )
    print(
        f"expansion of the whole job ({total} images): store puts {exp_puts} ({exp_puts / total:.3f}/image), "
        f"redis round trips {exp_trips}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images-per-batch", type=int, default=256)
    parser.add_argument("--infer-batch", type=int, default=128, help="images per forward pass (GPU default)")
    parser.add_argument("--modes", default="inline,staged,paths")
    args = parser.parse_args()

    from pupyl_queue.settings import Settings
    from pupyl_queue.stack import free_port, start_redis, stop
    from tests.imagegen import pattern_folder

    size = args.images_per_batch
    modes = [
        m
        for m in args.modes.split(",")
        if m != "paths" or "local_references" in Settings.__dataclass_fields__
    ]
    with tempfile.TemporaryDirectory(prefix="pupyl-roundtrips-") as tmp:
        work = Path(tmp)
        count = size // 8 + size // 4 + size // 2 + size  # batches ramp up to ``size``
        folder = pattern_folder(work / "images", range(count))
        port = free_port()
        proc = start_redis(work / "redis", port, appendonly=False)
        try:
            mean = sum(p.stat().st_size for p in folder.iterdir()) // count
            print(f"{count} images ({mean} bytes each on average, JPEG)")
            for mode in modes:
                report(run_mode(mode, size, args.infer_batch, work, folder, f"redis://127.0.0.1:{port}/0"))
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
