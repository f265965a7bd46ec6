"""The one settings object, read from the environment (``PUPYL_*``).

Built on demand by :meth:`Settings.from_env`, never at import time, so tests
and embedded stacks can build their own. Secrets are kept out of ``repr`` so a
logged settings object never leaks them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pupyl_queue import constants as C
from pupyl_queue.characteristics import Characteristic
from pupyl_queue.whitening import check_whitening

ENV_PREFIX = "PUPYL_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    """Every knob of pupyl-queue. Environment name = ``PUPYL_`` + upper-cased field."""

    data_dir: Path = field(default_factory=lambda: Path.home() / ".pupyl-queue")
    redis_url: str = ""
    store: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    s3_secure: bool = True
    s3_region: str = ""
    characteristic: Characteristic = Characteristic.MINIMUMWEIGHT_FAST_SMALL_PRECISION
    model: str = ""
    weights: str = ""
    batch_size: int = 64
    infer_batch: int = 0
    decode_threads: int = 0
    decode_processes: int = -1  # -1: one per core; 0: decode in the embed worker's threads
    embed_concurrency: int = 2  # batches one embed worker runs at once (threads, one network; write_claim.py)
    local_references: bool = False  # local files reach embed workers as paths (they see the same files)
    s3_references: bool = True  # s3:// sources reach embed workers as their s3:// names (read there)
    tf_threads: int = 0
    network_nice: int = 10  # CPU embed workers: the network's threads run nicer than the rest (priority.py)
    mixed_precision: bool = False
    precision: str = "float32"
    descriptor: str = C.DEFAULT_DESCRIPTOR  # global descriptor of new collections (constants.DESCRIPTORS)
    whitening: str = C.DEFAULT_WHITENING  # whitening of new collections: none, pca, pca:<s> (whitening.py)
    max_pixels: int = 64_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    inline_limit: int = 512 * 1024
    inline_item_bytes: int = 64 * 1024
    inline_batch_bytes: int = 1024 * 1024  # most image bytes one embed message carries inline
    result_expires: int = 24 * 3600
    visibility_timeout: int = 4 * 3600
    search_timeout: float = 60.0
    task_retries: int = 12  # retries of a transient failure (store unreachable) before a task fails for good
    task_retry_backoff_max: int = 60  # seconds: the longest wait between two of those retries
    job_stall_s: float = 600.0  # a job without progress this long is checked for lost tasks (jobs.py)
    fetch_concurrency: int = 16
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 30.0
    fetch_retries: int = 3
    fetch_max_redirects: int = 5
    fetch_allow_networks: str = ""
    allowed_roots: str = ""
    max_archive_bytes: int = 4 * 1024**3
    max_archive_ratio: int = 200
    max_archive_depth: int = 2
    max_list_bytes: int = 256 * 1024**2
    near_duplicate: float = 0.0
    near_duplicate_mode: str = (
        "vector"  # "copy": the check verifies local features (pupyl_queue/copysearch.py)
    )
    copy_short_list: int = 50  # candidates of the global stage a copy search verifies
    copy_short_list_gray: int = 200  # the same for a gray query (copydetect.is_gray)
    index_factory: str = ""
    index_nprobe: int = 0
    index_memory_gb: float = 12.0  # 10M 1024-d vectors fit as IVF-SQ8 (10 GB) on a 24 GB host
    flat_below: int = 100_000
    compact_commits: int = 256
    compact_interval: int = 3600
    snapshot_keep: int = 2
    compact_lock_s: int = 60  # a dead or stalled compaction's lock lapses after this (renewed while it runs)
    keep_originals: bool = False
    search_shards: int = 1
    api_tokens: str = field(default="", repr=False)
    metrics_tokens: str = field(default="", repr=False)  # also accepted on /metrics (Prometheus scrapers)
    api_auth: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_max_body: int = 32 * 1024 * 1024
    flower: bool = True
    flower_auth: bool = True
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    flower_user: str = "pupyl"
    flower_password: str = field(default="", repr=False)
    search_shard: int = -1
    search_memory_gb: float = 16.0
    worker_max_rss_mb: int = 6144  # a worker past this after a task stops warmly and is started anew
    worker_alive_s: int = 30  # a worker silent this long is dead: others put its tasks back (liveness)
    # Housekeeping (pupyl_queue/housekeeping.py): what would otherwise grow without bound.
    job_ttl: int = 7 * 24 * 3600  # a job's Redis record lives this long after the job ends; 0 = for good
    upload_grace: int = 3600  # an upload still unfinished (or leftovers of a gone job) after this is deleted
    query_ttl: int = 24 * 3600  # a query image put in the store and never searched is deleted after this
    housekeeping_interval: int = 3600  # seconds between Celery beat's housekeeping rounds

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        try:
            object.__setattr__(self, "characteristic", Characteristic.parse(self.characteristic))
        except ValueError as exc:
            raise SettingsError(f"PUPYL_CHARACTERISTIC: {exc}") from None
        if self.precision not in ("float32", "int8"):
            raise SettingsError(f"PUPYL_PRECISION must be float32 or int8, got {self.precision!r}")
        if self.descriptor not in C.DESCRIPTORS:
            raise SettingsError(
                f"PUPYL_DESCRIPTOR must be one of {', '.join(C.DESCRIPTORS)}, got {self.descriptor!r}"
            )
        try:
            object.__setattr__(self, "whitening", check_whitening(self.whitening))
        except ValueError as exc:
            raise SettingsError(f"PUPYL_WHITENING: {exc}") from None
        if self.near_duplicate_mode not in ("vector", "copy"):
            raise SettingsError(
                f"PUPYL_NEAR_DUPLICATE_MODE must be vector or copy, got {self.near_duplicate_mode!r}"
            )
        if not 1 <= self.copy_short_list <= 200 or not 1 <= self.copy_short_list_gray <= 500:
            raise SettingsError(
                "PUPYL_COPY_SHORT_LIST must be between 1 and 200, PUPYL_COPY_SHORT_LIST_GRAY 1 to 500"
            )
        if not 0 <= self.network_nice <= 19:
            raise SettingsError(f"PUPYL_NETWORK_NICE must be between 0 and 19, got {self.network_nice}")
        if self.batch_size < 1:
            raise SettingsError("PUPYL_BATCH_SIZE must be at least 1")
        if 0 < self.job_ttl < self.visibility_timeout:
            # A task redelivered after its job's record expired would no longer find its batch done.
            raise SettingsError("PUPYL_JOB_TTL must be 0 (keep) or at least PUPYL_VISIBILITY_TIMEOUT")
        if self.worker_alive_s < 3:
            raise SettingsError("PUPYL_WORKER_ALIVE_S must be at least 3 (a worker beats 3 times in it)")
        if min(self.upload_grace, self.query_ttl) < 1 or self.housekeeping_interval < 1:
            raise SettingsError("PUPYL_UPLOAD_GRACE, _QUERY_TTL and _HOUSEKEEPING_INTERVAL must be positive")
        if self.store and not self.store.startswith(("file://", "s3://")):
            raise SettingsError(f"PUPYL_STORE must be file:///path or s3://bucket/prefix, got {self.store!r}")

    @property
    def allowed_root_paths(self) -> list[Path]:
        """Local roots a request from the network may read (PUPYL_ALLOWED_ROOTS, comma-separated)."""
        return [Path(p.strip()).expanduser().resolve() for p in self.allowed_roots.split(",") if p.strip()]

    @property
    def store_url(self) -> str:
        """The store in use: ``PUPYL_STORE`` or the embedded default under the data dir."""
        return self.store or (self.data_dir / "store").resolve().as_uri()

    @property
    def broker_url(self) -> str:
        return self.redis_url or "redis://localhost:6379/0"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Characteristic):
                value = value.name
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def names(cls) -> list[str]:
        """Every environment variable this module reads."""
        return [ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)]


def _coerce(name: str, kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    env_name = ENV_PREFIX + name.upper()
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError as exc:
        raise SettingsError(f"{env_name} must be a {kind}, got {raw!r}") from exc
    return raw
