"""Formats shared by producers and workers: segments, vectors in messages, manifests, pointers.

One module that imports neither FAISS nor TensorFlow (only numpy and the store), so
the producer side (client, catalog, backup) can read what workers write on the base
install (DESIGN.md principle 12). It used to be spread over searcher.py (FAISS),
queries.py and compaction.py; a producer's ``describe()`` then imported FAISS
through compaction, and sharding.py and queries.py imported each other.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from pupyl_queue.layout import Layout
from pupyl_queue.payloads import VectorsPayload
from pupyl_queue.store import ObjectNotFound, ObjectStore

__all__ = [
    "decode_segment",
    "decode_segment_rows",
    "decode_vectors",
    "encode_segment",
    "encode_snapshot_rows",
    "read_snapshot_rows",
    "ROWS_FILE",
    "encode_vectors",
    "read_manifest",
    "read_pointer",
    "SegmentRows",
]


NPZ_TIME = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: every segment entry carries it


def encode_segment(ids: np.ndarray, vectors: np.ndarray, rows: SegmentRows | None = None) -> bytes:
    """A segment (or a snapshot's vector file): int64 ids and float32 vectors in one .npz, no pickle.

    ``rows``, when given, is what the segment says of each row beside its vector: the caller's key
    (or None), the content's sha256 and the attributes (or None). It travels as UTF-8 JSON bytes
    (``rows``), so the key map and the attributes can be derived from the store alone.
    """
    out = io.BytesIO()
    arrays = {"ids": np.asarray(ids, dtype=np.int64), "vectors": np.asarray(vectors, dtype=np.float32)}
    if rows is not None:
        if len({len(rows.keys), len(rows.sha256), len(rows.attributes), len(rows.values)}) != 1:
            raise ValueError("segment rows of unequal lengths")
        if len(rows.keys) != len(arrays["ids"]):
            raise ValueError(f"{len(rows.keys)} row records for {len(arrays['ids'])} ids")
        arrays["rows"] = np.frombuffer(json.dumps(rows.to_json(), separators=(",", ":")).encode(), np.uint8)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as npz:
        for name, array in arrays.items():
            # np.savez stamps each entry with the current time: the same arrays encoded a second
            # apart were other bytes. A fixed stamp makes the bytes a function of the arrays alone.
            with npz.open(zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_TIME), "w", force_zip64=True) as fh:
                npy_format.write_array(fh, array, allow_pickle=False)
    return out.getvalue()


def decode_segment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, vectors) of a segment; refuses pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["ids"], npz["vectors"]


def decode_segment_rows(data: bytes) -> tuple[np.ndarray, np.ndarray, SegmentRows]:
    """(ids, vectors, rows) of a segment; a segment written before keys existed has empty rows."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        ids, vectors = npz["ids"], npz["vectors"]
        if "rows" not in npz.files:
            return ids, vectors, SegmentRows.empty(len(ids))
        rows = SegmentRows.from_json(json.loads(npz["rows"].tobytes()))
    if len(rows.keys) != len(ids):
        raise ValueError(f"{len(rows.keys)} row records for {len(ids)} ids")
    return ids, vectors, rows


@dataclass
class SegmentRows:
    """Per row of a segment: the caller's key, the content sha256, the attributes and the built-in
    filterable values (format, width, height, job, indexed_at, path); None where a row has none."""

    keys: list[str | None] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    attributes: list[dict[str, Any] | None] = field(default_factory=list)
    values: list[dict[str, Any] | None] = field(default_factory=list)

    @classmethod
    def empty(cls, count: int) -> SegmentRows:
        return cls([None] * count, [None] * count, [None] * count, [None] * count)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SegmentRows:
        keys = list(value["keys"])
        return cls(
            keys,
            list(value.get("sha256") or [None] * len(keys)),
            list(value.get("attributes") or [None] * len(keys)),
            list(value.get("values") or [None] * len(keys)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "sha256": self.sha256,
            "attributes": self.attributes,
            "values": self.values,
        }

    def take(self, mask: np.ndarray) -> SegmentRows:
        """The rows where ``mask`` is true (a boolean array as long as the rows)."""
        picked = np.flatnonzero(mask).tolist()
        return SegmentRows(
            [self.keys[i] for i in picked],
            [self.sha256[i] for i in picked],
            [self.attributes[i] for i in picked],
            [self.values[i] for i in picked],
        )

    def extend(self, other: SegmentRows) -> None:
        self.keys += other.keys
        self.sha256 += other.sha256
        self.attributes += other.attributes
        self.values += other.values

    def filterable(self) -> list[dict[str, Any]]:
        """Each row's values a filter sees: the built-in ones and the caller's attributes."""
        return [{**(v or {}), **(a or {})} for v, a in zip(self.values, self.attributes)]

    def says_anything(self) -> bool:
        """Whether any row has a key, attributes or values (else a writer may leave the rows out)."""
        return any(k is not None for k in self.keys) or any(self.attributes) or any(self.values)


ROWS_FILE = "rows.json.gz"  # a snapshot's filterable values per live row (compaction writes it)


def encode_snapshot_rows(ids: list[int], values: list[dict[str, Any]]) -> bytes:
    """A snapshot's rows file: gzip of JSON ``{"ids": [...], "values": [{...}, ...]}``; a search
    worker builds its attribute table from it without reading the vector files."""
    return gzip.compress(json.dumps({"ids": ids, "values": values}, separators=(",", ":")).encode(), 6)


def read_snapshot_rows(data: bytes) -> tuple[list[int], list[dict[str, Any]]]:
    payload = json.loads(gzip.decompress(data))
    return [int(i) for i in payload["ids"]], list(payload["values"])


def encode_vectors(vectors: np.ndarray) -> VectorsPayload:
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
