"""Run by tests/test_shm_limit.py inside a 64 MB /dev/shm: two batches of 256 at once through decode
processes. Prints one JSON line: how many batches ran, how many images were indexed, the errors.

A file of its own (not ``python -c``): decode processes are spawned, and import the main module.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path


def main() -> None:
    from pupyl_queue.embedding import embed_batch
    from pupyl_queue.runtime import Runtime
    from pupyl_queue.settings import Settings
    from tests.imagegen import encode, pattern
    from tests.indexing import expand_folder

    redis_url, data, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    folder = data / "photos"
    folder.mkdir(parents=True)
    for n in range(800):  # the job's batches ramp up: 32, 64, 128, then two of 256
        (folder / f"{n:04d}.png").write_bytes(encode(pattern(n), "PNG"))
    rt = Runtime(Settings(data_dir=data / "store", redis_url=redis_url, decode_processes=2, batch_size=256))
    big = [b for b in expand_folder(rt, folder, model, job_id="shm") if len(b["items"]) == 256][:2]
    statuses: list[str] = []
    errors: list[str] = []

    def run(batch: dict) -> None:
        try:
            statuses.extend(item["status"] for item in embed_batch(rt, batch)["items"])
        except Exception as exc:  # the batch's task would fail: say how
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(batch,)) for batch in big]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"batches": len(big), "indexed": statuses.count("indexed"), "errors": errors}))


if __name__ == "__main__":
    main()
