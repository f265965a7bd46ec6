"""Worker-side bookkeeping hooked to Celery's task signals: per-task timings for /metrics."""

from __future__ import annotations

import logging
import threading
import time
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
