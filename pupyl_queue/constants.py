"""Every name shared between producers, workers and the store, in one place.

Task names, queue names, Redis keys and store prefixes are public contract:
other Celery clients enqueue by these names, and a running cluster's data is
laid out by them. Change them only with a schema version bump.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

# Celery queues (DESIGN.md: search never queues behind ingestion).
QUEUE_INGEST = "ingest"
QUEUE_EMBED = "embed"
QUEUE_SEARCH = "search"
QUEUE_MAINTENANCE = "maintenance"
QUEUES = (QUEUE_INGEST, QUEUE_EMBED, QUEUE_SEARCH, QUEUE_MAINTENANCE)

# Celery task names and the queue each one is routed to.
TASK_INDEX = "pupyl.index"
TASK_EMBED = "pupyl.embed"
TASK_SEARCH = "pupyl.search"
TASK_NEAREST = "pupyl.nearest"
TASK_SEARCH_SHARD = "pupyl.search_shard"  # sent by a router to each shard's own queue
TASK_REMOVE = "pupyl.remove"
TASK_COMPACT = "pupyl.compact"
TASK_COMPACT_ALL = "pupyl.compact_all"
TASK_HOUSEKEEP = "pupyl.housekeep"  # Celery beat: expire ended jobs, delete cut-off uploads, stale queries
TASK_SWEEP_JOBS = "pupyl.sweep_jobs"
TASK_SET_ATTRIBUTES = "pupyl.set_attributes"  # new attributes for a key's image, its vector reused
TASK_ROUTES = {
    TASK_INDEX: QUEUE_INGEST,
    TASK_EMBED: QUEUE_EMBED,
    TASK_SEARCH: QUEUE_SEARCH,
    TASK_NEAREST: QUEUE_SEARCH,
    TASK_SET_ATTRIBUTES: QUEUE_SEARCH,  # a search worker holds the vector it reuses
    TASK_REMOVE: QUEUE_MAINTENANCE,
    TASK_COMPACT: QUEUE_MAINTENANCE,
    TASK_COMPACT_ALL: QUEUE_MAINTENANCE,
    TASK_HOUSEKEEP: QUEUE_MAINTENANCE,
    TASK_SWEEP_JOBS: QUEUE_MAINTENANCE,
}


def shard_queue(shard: int) -> str:
    """The queue of one search shard (its replicas share it)."""
    return f"{QUEUE_SEARCH}.shard{shard}"


DEFAULT_COLLECTION = "default"
# A collection's global descriptor (pupyl_queue/models.py): how the network's last feature maps
# become one vector. "avg" is the networks' own average pooling; "gem" generalized-mean pooling
# (p = 3); "+mirror" sums the image's and its mirror image's unit vectors (BENCHMARKS.md, issue 18).
DESCRIPTORS = ("avg", "avg+mirror", "gem", "gem+mirror")
DEFAULT_DESCRIPTOR = "avg"  # a manifest without one has this one
# A collection's whitening (pupyl_queue/whitening.py): "none", or PCA whitening learned at compaction,
# "pca" (eigenvalues to the power -s/2, s = WHITENING_STRENGTH) or "pca:<s>" (BENCHMARKS.md, issue 18).
DEFAULT_WHITENING = "none"  # a manifest without one has this one
WHITENING_STRENGTH = 0.5  # half strength: full whitening (s = 1) lost recall and P@10 both
WHITENING_MIN_PER_DIM = 2  # live vectors per dimension before compaction learns a whitening...
WHITENING_MIN_VECTORS = 64  # ...and never from fewer than this many
WHITENING_SAMPLE = 50_000  # vectors the covariance is estimated on (an even sample of the live ones)
WHITENING_EIGEN_FLOOR = 1e-6  # eigenvalues floored at this share of the largest (dead channels)
WHITENING_RESCORE = 8  # the vector near-duplicate check re-scores this many whitened hits by raw cosine
# Fewer queries than this search on one FAISS thread: a query or a few gain nothing from OpenMP's
# team, and on a busy core its barrier waits a scheduler slice (6-10 ms against 0.1 ms beside a copy
# search's SIFT; BENCHMARKS.md, session 8 of issue 18).
FAISS_PARALLEL_MIN_QUERIES = 8
SEARCH_MODES = ("similar", "copy")  # copy: find the original of an edited copy (pupyl_queue/copysearch.py)
COLLECTION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # fullmatch: "$" passes "default\n"

# How long a worker waits in place for Redis (a restart, a failover) before giving up: a task body
# (workers/tasks.py riding_out_redis) and Celery's own result writes around it (celery_app.py).
REDIS_WAIT_S = 600
BROKER_ACK_WAIT_S = 120  # how long an ack waits for an unreachable broker (broker_fixes.py)
BACKEND_RETRY_SLEEP_MAX_MS = 2000  # longest pause between two tries of a result write: ~1 s on average
# A batch's segment and metadata object are written by one live run at a time (write_claim.py): the
# claim's lease, renewed by its holder every third of it; and how long another run waits for it.
WRITE_CLAIM_S = 30
WRITE_CLAIM_WAIT_S = 600

# Redis keys; every one is prefixed by REDIS_PREFIX and the collection name.
REDIS_PREFIX = "pupyl"
KEY_ID_COUNTER = "ids"  # INCRBY: next image id
KEY_SEQUENCE = "seq"  # INCR: last commit sequence number
KEY_CHANGES = "changes"  # INCR on every commit: one GET tells a searcher it is stale
KEY_COUNT = "count"  # images indexed and not removed
KEY_COMMITS = "commits"  # ZSET score=sequence member=store key of the segment/tombstone
KEY_COMMIT_BY_OBJECT = "commit-of"  # HASH store key -> sequence (idempotent publish)
KEY_SNAPSHOT = "snapshot"  # watermark of the newest published snapshot
KEY_HASHES = "hashes"  # HASH sha256 -> id (dedup)
KEY_PENDING_CLAIMS = "claims-pending"  # HASH sha256 -> "id@batch id" until that batch commits or fails
KEY_BATCH_IDS = "batch-ids"  # HASH batch id -> first id (a batch owns ids first .. first + count - 1)
KEY_ORPHANS = "orphans"  # SET of store keys a batch that can no longer commit left (store down): housekeeping
KEY_META_RANGES = "meta-ranges"  # ZSET score=first id member=batch id: whose metadata object holds an id
KEY_REMOVED = "removed"  # SET of removed ids: their metadata reads as absent (pupyl_queue/metadata.py)
KEY_META_VERSION = "meta-version"  # INCR: names the batch metadata objects a prune rewrites (metadata.py)
KEY_META_SUPERSEDED = (
    "meta-superseded"  # ZSET member=batch object name score=version: deleted at the next prune
)
KEY_CHECKSUMS = "checksums"  # HASH store key -> sha256 of a committed segment or tombstone (integrity.py)
KEY_JOB = "job"  # job:{id} HASH of counters, job:{id}:batches HASH of finished batches
KEY_EPOCH = "epoch"  # set when the commit log is rewritten (rebuild): searchers reload from the snapshot
KEY_TASK = "task"  # task:{id}: a task id the API handed out (expires with its result)
KEY_KEYS = "keys"  # HASH caller's key -> JSON {"id", "seq", "sha256"}: the live image of each key
KEY_KEY_OF = "key-of"  # HASH id -> caller's key (the reverse of KEY_KEYS, live ids only)
KEY_REPLACED = "replaced"  # HASH segment store key -> JSON [[old id, key], ...] its commit tombstoned
KEY_WRITE_CLAIM = "writing"  # writing:{store key} STRING token, with a lease: the one run writing it
KEY_RECENT_JOBS = "jobs"  # ZSET score=created_at member=job id (the newest RECENT_JOBS_KEPT jobs)
RECENT_JOBS_KEPT = 1000
UPLOAD_SCHEME = "upload:"  # uri of a job whose images were uploaded into the store (upload:<job id>)
ITEMS_SCHEME = "items:"  # uri of a job whose request lists its images (items:<job id>, field "items")
MAX_REQUEST_ITEMS = 1000  # images one request lists with their keys (JSON "items", multipart keys)
MAX_REQUEST_ITEMS_BYTES = 1 << 20  # their JSON in all: it travels in the task message

# Object store layout under the collection prefix.
STORE_COLLECTIONS = "collections"
STORE_MANIFEST = "manifest.json"
STORE_IMAGES = "images"
STORE_META = "meta"  # one metadata object per embed batch (pupyl_queue/metadata.py)
STORE_SEGMENTS = "segments"
STORE_TOMBSTONES = "tombstones"
STORE_SNAPSHOTS = "snapshots"
STORE_SNAPSHOT_POINTER = "snapshots/LATEST.json"
SNAPSHOT_WHITENING = "whitening.npz"  # a snapshot's whitening (pupyl_queue/whitening.py), when it has one
STORE_VECTORS = "vectors"  # live vectors merged at compaction: the input of the next one
STORE_STAGING = "staging"
STORE_JOBS = "jobs"
STORE_QUERIES = "queries"
STORE_UPLOADS = "uploads"  # images uploaded through the API, until their job is done

JOB_STATES = ("uploading", "queued", "expanding", "running", "done", "partial", "failed")
# Terminal states: a job in one never changes again; its record expires PUPYL_JOB_TTL after (docs/tasks.md).
JOB_ENDED = ("done", "partial", "failed")
