"""Indexing in the test process: the ingest and embed stages run here, against real Redis and stores."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from pupyl_queue.embedding import Nearest, embed_batch
from pupyl_queue.ingest import expand_job
from pupyl_queue.runtime import Runtime


def expand_folder(
    rt: Runtime, folder: Path, model: Path, collection: str = "default", job_id: str = "", **options: Any
) -> list[dict[str, Any]]:
    """The embed batches a job over ``folder`` dispatches (not yet run)."""
    job_id = job_id or uuid.uuid4().hex
    rt.coordinator(collection).create_job(job_id, {"collection": collection})
    request = {
        "job_id": job_id,
        "collection": collection,
        "uri": str(folder),
        "model": str(model),
        "origin": "local",
    }
    batches: list[dict[str, Any]] = []
    expand_job(rt, {**request, **options}, batches.append)
    return batches


def index_folder(
    rt: Runtime,
    folder: Path,
    model: Path,
    collection: str = "default",
    nearest: Nearest | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run a whole job; every item's outcome, in order."""
    batches = expand_folder(rt, folder, model, collection, **options)
    return [item for batch in batches for item in embed_batch(rt, batch, nearest)["items"]]
