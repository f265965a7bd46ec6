"""Formats shared by producers and workers: segments, vectors in messages, manifests, pointers.

One module that imports neither FAISS nor TensorFlow (only numpy and the store), so
the producer side (client, catalog, backup) can read what workers write on the base
install (DESIGN.md principle 12). It used to be spread over searcher.py (FAISS),
queries.py and compaction.py; a producer's ``describe()`` then imported FAISS
through compaction, and sharding.py and queries.py imported each other.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore

__all__ = [
    "decode_segment",
    "decode_vectors",
    "encode_segment",
    "encode_vectors",
    "read_manifest",
    "read_pointer",
]


def encode_segment(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """A segment (or a snapshot's vector file): int64 ids and float32 vectors in one .npz, no pickle."""
    out = io.BytesIO()
    np.savez(out, ids=np.asarray(ids, dtype=np.int64), vectors=np.asarray(vectors, dtype=np.float32))
    return out.getvalue()


def decode_segment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, vectors) of a segment; refuses pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["ids"], npz["vectors"]


def encode_vectors(vectors: np.ndarray) -> dict[str, Any]:
    """Vectors for a message: base64 float32 (a quarter of the JSON-number size)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return {"vectors_b64": base64.b64encode(vectors.tobytes()).decode(), "dim": int(vectors.shape[1])}


def decode_vectors(payload: dict[str, Any]) -> np.ndarray:
    """The (n, dim) float32 array of a message made by ``encode_vectors``."""
    flat = np.frombuffer(base64.b64decode(payload["vectors_b64"], validate=True), dtype=np.float32)
    return flat.reshape(-1, int(payload["dim"]))


def read_pointer(store: ObjectStore, layout: Layout) -> dict[str, Any] | None:
    """The manifest of the snapshot the collection's pointer names; None before the first snapshot."""
    try:
        pointer = json.loads(store.get(layout.snapshot_pointer))
        return json.loads(store.get(f"{pointer['path']}/manifest.json"))
    except ObjectNotFound:
        return None


def read_manifest(store: ObjectStore, layout: Layout) -> dict[str, Any] | None:
    """The collection's manifest (its model, written at creation); None for a collection never indexed."""
    try:
        return json.loads(store.get(layout.manifest))
    except ObjectNotFound:
        return None
