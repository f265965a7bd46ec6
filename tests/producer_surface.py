"""The producer's whole surface, run as a script where FAISS, TensorFlow, workers/ and api/ are gone.

tests/test_producer_install.py runs it in a child process against a real stack (Redis and
Celery workers started by the test). Before anything else it puts ``None`` in
``sys.modules`` for the modules a base install (``pip install pupyl-queue``, no ``[cpu]``
or ``[gpu]``) does not have, or a producer must not load: any import of them, however
indirect or lazy, then raises ModuleNotFoundError, as it would on that install.
Settings come from the environment (PUPYL_*). Prints one JSON line of what it saw.

Usage: python tests/producer_surface.py PHOTO_FOLDER OUT_FOLDER
"""

from __future__ import annotations

import sys

ABSENT = ("faiss", "tensorflow", "keras", "jax", "torch", "workers", "api")
for _name in ABSENT:
    sys.modules[_name] = None  # type: ignore[assignment]

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from pupyl_queue import PupylQueue  # noqa: E402


def run(photos: Path, out: Path) -> dict[str, object]:
    client = PupylQueue()
    seen: dict[str, object] = {}
    job = client.index(photos)
    state = job.wait(timeout=240)
    seen["job"] = {k: state[k] for k in ("total", "indexed", "failed", "duplicate")}
    seen["done"] = client.job(job.id).done()
    seen["failures"] = sorted(Path(item["ref"]).name for item in job.failures())
    seen["report"] = len(job.report())
    query = sorted(photos.glob("generated_*.jpg"))[0]
    hits = client.search(query, top=3, return_metadata=True, min_sequence=job.sequence)
    seen["top_name"] = hits[0]["original_file_name"]
    top_id = int(hits[0]["id"])
    seen["by_bytes"] = client.search(query.read_bytes(), top=1)
    seen["by_id"] = client.search(top_id, top=1)
    described = client.describe()
    seen["describe"] = {k: described[k] for k in ("name", "dim", "images", "index_type", "last_snapshot")}
    vector = np.random.default_rng(0).normal(size=int(described["dim"])).astype(np.float32)
    seen["by_vector"] = len(client.search(vector, top=2, return_distances=True))
    seen["async_count"] = client.search_async(query, top=1).get(timeout=60)["count"]
    seen["collections"] = client.collections()
    seen["compact_count"] = client.compact(timeout=240)["count"]
    seen["snapshot_after_compact"] = client.describe()["last_snapshot"] is not None
    seen["exported"] = sorted(p.name for p in client.export(query, out / "export", top=2))
    removed = client.remove(top_id)
    after = client.search(query, top=20, min_sequence=removed["sequence"])
    seen["removed"] = removed["removed"] and top_id not in after
    second = {k: v for k, v in hits[1].items() if k != "distance"}
    seen["metadata"] = [client.metadata(int(second["id"])) == second, client.metadata(top_id)]
    upload = client.index_uploads([("upload.png", (photos.parent / "upload.png").read_bytes())])
    seen["uploaded"] = upload.wait(timeout=240)["indexed"]
    seen["backup"] = client.backup(out / "backup.tar")["files"] > 0
    seen["restored"] = client.restore(out / "backup.tar", as_name="copy")["collection"]
    seen["copy_images"] = client.describe("copy")["images"]
    seen["deleted"] = client.delete_collection("copy")["name"]
    seen["collections_after"] = client.collections()
    client.close()
    # Nothing blocked was loaded behind a broad except: each name still maps to None.
    seen["loaded"] = sorted(n for n in ABSENT if sys.modules.get(n) is not None)
    return seen


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), Path(sys.argv[2]))))
