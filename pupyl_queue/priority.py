"""On a CPU embed worker the network's threads run at a lower priority than the rest of the host.

There the network shares the cores with its decode processes, the feeding threads,
the ingest worker, Redis and, under ``pupyl-queue up``, the search worker. At equal
priority a search waits for its share of a core behind a bulk job's network; with
the network's threads lowered (Linux nice, per thread) the others take a core as soon
as they have work, and the network gets every cycle they leave: alone it runs as fast
as before. Measured on 2 cores (BENCHMARKS.md, session 15): searches under ingest load
p99 -15%; ingest alone unchanged (the decode processes had their share already).

Not on a GPU worker: there the threads the network's library starts feed the GPU.
Linux only (nice is per thread there); elsewhere this does nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable

LINUX = sys.platform.startswith("linux")


def native_threads() -> list[int]:
    """This process's threads that Python did not start: the compute pools of TensorFlow,
    XLA, OpenMP (PyTorch, FAISS) and the like. Python's own threads (Celery's pool, the
    feeding and store-write threads) are not among them. A library thread that has called
    into Python (a "dummy" thread to ``threading``) is still the library's.

    Empty while one of Python's threads is still starting (its native id not yet known, it
    would look like a library's): the caller tries again at its next batch.
    """
    if not LINUX:
        return []
    try:
        listed = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []
    started = [t for t in threading.enumerate() if not isinstance(t, threading._DummyThread)]
    if any(t.native_id is None for t in started):
        return []
    ours = {t.native_id for t in started}
    return [tid for tid in listed if tid not in ours]


def lower(threads: Iterable[int], nice: int) -> list[int]:
    """Raise these threads' niceness to ``nice`` (never lower it: that needs privileges);
    the ones changed. A thread gone meanwhile is skipped."""
    changed = []
    if not LINUX or nice <= 0:
        return changed
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed.append(tid)
        except OSError:  # exited since it was listed
            continue
    return changed


def niceness(tid: int) -> int | None:
    """A thread's nice value, None when it is gone (or off Linux)."""
    if not LINUX:
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
