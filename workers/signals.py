"""Worker-side bookkeeping hooked to Celery's task signals: per-task timings for /metrics, memory bound."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun

from pupyl_queue import telemetry
from pupyl_queue.runtime import runtime

log = logging.getLogger(__name__)
_started: dict[str, float] = {}
_lock = threading.Lock()  # the ingest workers run a thread pool


@task_prerun.connect
def _start_clock(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        with _lock:
            _started[task_id] = time.perf_counter()


@task_postrun.connect
def _record(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    with _lock:
        started = _started.pop(task_id or "", None)
    if started is None or task is None:
        return
    try:
        telemetry.record_task(runtime().redis, task.name, time.perf_counter() - started, state or "UNKNOWN")
    except Exception:  # noqa: BLE001 - a metric must never fail the task it measures
        log.debug("could not record the timing of %s", task.name, exc_info=True)
    # A search worker's indexes are bounded by PUPYL_SEARCH_MEMORY_GB, not by this: count them apart.
    rt = runtime()
    _stop_if_too_big(rt.settings.worker_max_rss_mb, rt.index_bytes() / 2**20)


def resident_mb() -> float:
    """This process's resident memory now (not its peak), from /proc; 0 where there is none."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def over_bound(used_mb: float, limit_mb: int) -> bool:
    return limit_mb > 0 and used_mb > limit_mb


def _stop_if_too_big(limit_mb: int, indexes_mb: float = 0.0) -> None:
    """Bound a long-running worker's memory: the TensorFlow workers run ``--pool solo`` (no fork after
    TensorFlow), where Celery's max-tasks/max-memory-per-child do not apply. Past the limit, a warm
    shutdown (SIGTERM: the task just run is acknowledged first) and the supervisor (``up``, compose,
    Kubernetes) starts a fresh process.
    """
    used = resident_mb() - indexes_mb
    if over_bound(used, limit_mb):
        log.warning(
            "resident memory %.0f MiB (besides %.0f MiB of indexes) > PUPYL_WORKER_MAX_RSS_MB=%d: "
            "stopping, to be restarted",
            used,
            indexes_mb,
            limit_mb,
        )
        os.kill(os.getpid(), signal.SIGTERM)
