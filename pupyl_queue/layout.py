"""Where a collection's things live: store keys and Redis keys, derived in one place."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pupyl_queue import constants as C


def check_collection(name: str) -> str:
    if not isinstance(name, str) or not C.COLLECTION_NAME.fullmatch(name):
        raise ValueError(
            f"invalid collection name {name!r}: use 1-63 of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


class Layout:
    """Store keys and Redis keys of one collection."""

    def __init__(self, collection: str = C.DEFAULT_COLLECTION) -> None:
        self.collection = check_collection(collection)
        self.root = f"{C.STORE_COLLECTIONS}/{collection}"

    # --- store
    @property
    def manifest(self) -> str:
        return f"{self.root}/{C.STORE_MANIFEST}"

    @property
    def model_file(self) -> str:
        return f"{self.root}/model.keras"

    @property
    def calibration(self) -> str:
        """Folder of images an int8 model of this collection is calibrated on."""
        return f"{self.root}/calibration"

    def int8_model(self, source_hash: str) -> str:
        return f"{self.root}/int8/{source_hash}.tflite"

    def image(self, image_id: int) -> str:
        return f"{self.root}/{C.STORE_IMAGES}/{image_id}.jpg"

    def original(self, image_id: int) -> str:
        """The file as uploaded, kept only with PUPYL_KEEP_ORIGINALS."""
        return f"{self.root}/{C.STORE_IMAGES}/{image_id}.orig"

    def local_features(self, image_id: int) -> str:
        """The stored copy's local features (copy detection): written by a copy-mode near-duplicate
        check at ingestion, else by the first copy search that needs them."""
        return f"{self.root}/{C.STORE_IMAGES}/{image_id}.sift"

    def image_meta(self, image_id: int) -> str:
        """One image's metadata in the layout before batch objects: still read, never written."""
        return f"{self.root}/{C.STORE_IMAGES}/{image_id}.json"

    def batch_meta(self, batch_id: str) -> str:
        """The metadata of every image an embed batch kept (pupyl_queue/metadata.py)."""
        return f"{self.root}/{C.STORE_META}/{batch_id}.json"

    def segment(self, batch_id: str) -> str:
        return f"{self.root}/{C.STORE_SEGMENTS}/{batch_id}.npz"

    def batch_objects(self, batch_id: str, ids: Iterable[int]) -> list[str]:
        """Every object an embed batch may write before its commit, under its ids: what a batch
        that can no longer commit (its job counted it failed) must not leave in the store."""
        keys = [self.batch_meta(batch_id), self.segment(batch_id)]
        for image_id in ids:
            keys += [self.image(image_id), self.original(image_id), self.local_features(image_id)]
        return keys

    def tombstone(self, image_id: int) -> str:
        return f"{self.root}/{C.STORE_TOMBSTONES}/{image_id}.json"

    def snapshot(self, sequence: int) -> str:
        return f"{self.root}/{C.STORE_SNAPSHOTS}/{sequence:016d}"

    @property
    def snapshot_pointer(self) -> str:
        return f"{self.root}/{C.STORE_SNAPSHOT_POINTER}"

    def staging(self, job_id: str) -> str:
        return f"{self.root}/{C.STORE_STAGING}/{job_id}"

    def staged_item(self, job_id: str, number: int) -> str:
        return f"{self.staging(job_id)}/{number}"

    def uploads(self, job_id: str) -> str:
        return f"{self.root}/{C.STORE_UPLOADS}/{job_id}"

    def upload(self, job_id: str, number: int, name: str) -> str:
        """Numbered so the job reads them in upload order; the name is kept for the metadata."""
        base = name.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".")  # a name, never a path
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:] or "image"
        return f"{self.uploads(job_id)}/{number:06d}-{safe}"

    def job_reports(self, job_id: str) -> str:
        """Folder of a job's per-batch reports: kept in the store after the job's Redis record expires."""
        return f"{self.root}/{C.STORE_JOBS}/{job_id}"

    def job_report(self, job_id: str, batch: int) -> str:
        return f"{self.job_reports(job_id)}/batch-{batch:06d}.json"

    @property
    def queries(self) -> str:
        return f"{self.root}/{C.STORE_QUERIES}"

    def query(self, name: str) -> str:
        return f"{self.queries}/{name}"

    # --- redis
    def key(self, name: str) -> str:
        return f"{C.REDIS_PREFIX}:{self.collection}:{name}"

    @staticmethod
    def task_key(task_id: str) -> str:
        """Marks a task id the API handed out, so an unknown id is told from a queued task."""
        return f"{C.REDIS_PREFIX}:{C.KEY_TASK}:{task_id}"

    def job_key(self, job_id: str) -> str:
        return f"{C.REDIS_PREFIX}:{C.KEY_JOB}:{job_id}"
