"""The task payloads (JSON keyword arguments) and main results, as TypedDicts: docs/tasks.md in code.

Why here: the tasks are a public contract (any Celery client may send them without importing this
package), and the producers (client.py, ingest.py, sharding.py, workers/tasks.py) and the task
bodies used to pass plain ``dict[str, Any]``; a key renamed on one side went unseen.
tests/test_payloads.py checks every JSON example of docs/tasks.md, and what the producers really
build, against these types.

``Required`` means a sender must give the key: the task reads it without a default. Keys the
task reads with a default are ``NotRequired``, even where this package's own producers always send
them (e.g. ``top``, ``check_unique``): another producer may leave them out. ``collection`` is
required everywhere: the workers' fallback to ``default`` is leniency, not contract.

A producer-side module: standard library only (no workers/, api/, FAISS or TensorFlow).
"""

# No ``from __future__ import annotations``: on Python 3.11 it makes TypedDict ignore ``Required`` and
# ``NotRequired`` (every key lands in __optional_keys__); tests/test_payloads.py relies on them.
from typing import Any, Literal, NotRequired, Required, TypedDict

Origin = Literal["network", "local"]
SearchMode = Literal["similar", "copy"]
Attributes = dict[str, Any]  # a caller's attributes (pupyl_queue/attributes.py checks them)
Filter = dict[str, Any]  # a search filter (pupyl_queue/attributes.py parses it)
Hit = list[Any]  # [id, cosine distance] (JSON has no tuples)

__all__ = [
    "CompactAllResult",
    "CompactRequest",
    "CopyVerdict",
    "Damage",
    "EmbedItem",
    "EmbedItemReport",
    "EmbedRequest",
    "EmbedResult",
    "ErrorItem",
    "HousekeepResult",
    "IndexRequest",
    "IndexResult",
    "InlineItem",
    "LocalItem",
    "NearestRequest",
    "NearestResult",
    "RemoveByIdRequest",
    "RemoveByKeyRequest",
    "RemoveRequest",
    "RemoveResult",
    "SearchHit",
    "SearchQuery",
    "SearchRequest",
    "SearchResult",
    "SetAttributesRequest",
    "SetAttributesResult",
    "ShardRequest",
    "ShardSearchRequest",
    "ShardSearchResult",
    "ShardVectorRequest",
    "ShardVectorResult",
    "StagedItem",
    "SweepJobsResult",
    "VectorsPayload",
]


# --- pupyl.index
class ListedItem(TypedDict, total=False):
    """One row of an ``items`` request (PupylQueue.index_items, the API's JSON items)."""

    uri: str
    url: str
    key: str
    attributes: Attributes


class UploadKeys(TypedDict, total=False):
    """What the API's multipart request gave for uploaded file n: its key and attributes, or why not."""

    key: str
    attributes: Attributes
    error: str


class IndexRequest(TypedDict, total=False):
    """``pupyl.index``: expand a URI into embed batches. Sent with ``task_id`` = the job id."""

    job_id: str  # the task id stands in when absent
    collection: Required[str]
    uri: Required[str]
    origin: Origin  # default "network": local paths confined to PUPYL_ALLOWED_ROOTS
    check_unique: bool
    near_duplicate: float  # a cosine distance; 0 = off
    characteristic: int | str | None  # named by the caller: a mismatch fails the job
    default_characteristic: int | str  # used only to create the collection
    model: str | None  # a .keras path on the ingest worker
    precision: str | None  # "float32" or "int8", named by the caller
    default_precision: str | None  # used only to create the collection
    descriptor: str | None  # avg, avg+mirror, gem, gem+mirror: named by the caller
    default_descriptor: str | None  # used only to create the collection
    whitening: str | None  # none, pca, pca:<s>: named by the caller
    default_whitening: str | None  # used only to create the collection
    key: str | None  # the caller's key of the one image the URI names (an upsert)
    attributes: Attributes | None
    items: list[ListedItem]  # with uri "items:<job_id>": the images the request lists
    uploads: list[UploadKeys]  # with an "upload:" uri: file n's key and attributes, or its error


class IndexResult(TypedDict):
    job_id: str
    total: int
    batches: int


# --- pupyl.embed: one item's bytes travel one way (or the item failed at expansion already)
class _ItemBase(TypedDict, total=False):
    ref: Required[str]  # where the image came from (path, URL, member, upload name)
    meta: dict[str, Any]  # the source's metadata (file name, size, times, list, ...)
    image_key: str  # the caller's key ("key" is the staged copy)
    attributes: Attributes


class InlineItem(_ItemBase):
    data_b64: str  # small images, while the message stays under 1 MiB


class StagedItem(_ItemBase):
    key: str  # the staged copy in the store, deleted once the batch is counted


class LocalItem(_ItemBase):
    path: str  # PUPYL_LOCAL_REFERENCES: a resolved local file the embed worker reads itself


class S3Item(_ItemBase):
    s3: str  # PUPYL_S3_REFERENCES: an s3://bucket/key object the embed worker reads itself


class UploadItem(_ItemBase):
    upload: str  # an upload of this job in the store, read by the embed worker (deleted when the job ends)


class ErrorItem(_ItemBase):
    error: str  # failed at expansion (too large, unreadable, ...): reported as failed


EmbedItem = InlineItem | StagedItem | LocalItem | S3Item | UploadItem | ErrorItem


class EmbedRequest(TypedDict, total=False):
    """``pupyl.embed``, sent by ``pupyl.index`` only; task id ``<job_id>-<batch, 6 digits>``."""

    job_id: Required[str]
    collection: Required[str]
    batch: Required[int]
    items: Required[list[EmbedItem]]
    check_unique: bool
    origin: Origin
    near_duplicate: float


class EmbedItemReport(TypedDict, total=False):
    """One item's outcome, in the embed result and the job's report in the store."""

    ref: str | None  # None only for items of a lost batch failed by the sweep
    status: Required[Literal["indexed", "duplicate", "unchanged", "failed"]]
    id: int  # indexed: its id; unchanged: the image its key names already
    key: str  # the caller's key
    duplicate_of: int
    distance: float  # a near duplicate's cosine distance
    copy_score: float  # a copy-mode duplicate's probability of being a copy
    replaced: bool  # its key was taken over by a later item of the same batch
    error: str


class EmbedResult(TypedDict):
    batch: int
    sequence: int | None  # None when nothing was indexed
    indexed: int
    duplicate: int
    failed: int
    unchanged: int
    wait_s: float  # inference waiting for decoded images
    infer_s: float
    write_s: float
    items: list[EmbedItemReport]


# --- pupyl.search
class ImageQuery(TypedDict):
    image_b64: str


class StoredQuery(TypedDict):
    key: str  # collections/<c>/queries/<name>, deleted after use


class IdQuery(TypedDict):
    id: int


class VectorQuery(TypedDict):
    vector: list[float]


SearchQuery = ImageQuery | StoredQuery | IdQuery | VectorQuery


class SearchRequest(TypedDict, total=False):
    collection: Required[str]
    query: Required[SearchQuery]
    top: int  # default 4; 1 to 10000
    metadata: bool
    min_sequence: int
    wait_timeout: float  # how long to wait for min_sequence (default 30 s)
    allow_partial: bool  # sharded clusters: accept an answer without a shard
    shard_timeout: float  # sharded clusters: default PUPYL_SEARCH_TIMEOUT
    mode: SearchMode
    filter: Filter


class SearchHit(TypedDict, total=False):
    id: Required[int]
    distance: Required[float]
    key: str
    metadata: dict[str, Any] | None  # None when the image went meanwhile
    copy_score: float
    inliers: int


class CopyVerdict(TypedDict, total=False):
    found: Required[bool]
    id: Required[int | None]
    score: Required[float]
    inliers: Required[int]
    mirrored: bool


class Damage(TypedDict):
    key: str
    reason: str


class SearchResult(TypedDict, total=False):
    collection: Required[str]
    sequence: Required[int]
    count: Required[int]
    took_ms: Required[float]
    results: Required[list[SearchHit]]
    mode: Literal["copy"]
    copy: CopyVerdict
    verify_ms: float
    degraded: bool
    damaged: list[Damage]
    partial: bool
    missing_shards: list[int]


# --- pupyl.nearest and pupyl.search_shard: vectors travel as base64 float32 (codecs.encode_vectors)
class VectorsPayload(TypedDict):
    vectors_b64: str  # float32, row-major
    dim: int


class NearestRequest(TypedDict, total=False):
    collection: Required[str]
    vectors_b64: Required[str]
    dim: Required[int]
    top: int  # 1 to 200: with it, the result has candidates


class NearestResult(TypedDict, total=False):
    nearest: Required[list[Hit | None]]  # None: the index is empty
    candidates: list[list[Hit]]
    degraded: bool
    damaged: list[Damage]


class ShardSearchRequest(TypedDict, total=False):
    collection: Required[str]
    vectors_b64: Required[str]
    dim: Required[int]
    top: Required[int]
    min_sequence: int
    wait_timeout: float
    filter: Filter
    raw_distances: bool  # whitened hits re-scored by raw cosine (the vector near-duplicate check)


class ShardVectorRequest(TypedDict, total=False):
    collection: Required[str]
    id: Required[int]  # the owner shard answers with that image's vector
    min_sequence: int
    wait_timeout: float


ShardRequest = ShardSearchRequest | ShardVectorRequest


class ShardSearchResult(TypedDict, total=False):
    hits: Required[list[list[Hit]]]
    sequence: Required[int]
    count: Required[int]
    degraded: bool
    damaged: list[Damage]


ShardVectorResult = VectorsPayload


# --- pupyl.remove, pupyl.set_attributes, pupyl.compact
class RemoveByIdRequest(TypedDict):
    collection: str
    id: int


class RemoveByKeyRequest(TypedDict):
    collection: str
    key: str


RemoveRequest = RemoveByIdRequest | RemoveByKeyRequest


class RemoveResult(TypedDict, total=False):
    id: int
    key: str
    removed: Required[bool]
    sequence: int
    reason: str


class SetAttributesRequest(TypedDict):
    collection: str
    key: str
    attributes: Attributes  # replace the old ones whole
    update_id: NotRequired[str]  # 8-64 hex digits, fresh per request: a redelivery makes no second update


class SetAttributesResult(TypedDict, total=False):
    key: Required[str]
    updated: Required[bool]
    id: int
    replaced: int  # absent when a redelivery finished the update
    sequence: int
    reason: str


class CompactRequest(TypedDict):
    collection: str


# The compaction result is the snapshot's manifest (open-ended), or {"skipped": reason}.


# --- Celery beat's tasks take no arguments
class CompactAllResult(TypedDict):
    queued: list[str]


class SweepJobsResult(TypedDict):
    ended: dict[str, str]  # job id -> its new state


class HousekeepResult(TypedDict):
    jobs_expired: int
    uploads_abandoned: int
    job_folders_deleted: int
    objects_deleted: int
    queries_deleted: int
    batch_ids_forgotten: int
    orphans_deleted: int
    collections_skipped: int
