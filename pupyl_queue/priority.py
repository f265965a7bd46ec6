"""On a CPU embed worker the network's threads run at a lower priority than what feeds them.

There the network, the decode processes, the feeding thread, the ingest worker and
Redis share the same cores. At equal priority the scheduler gives the network's
threads their fair share of a core while a decode process still has the next chunk
to finish, and the network then waits for that chunk (``wait_s`` in the bench). With
the network's threads lowered (Linux nice, per thread), the feeding stages run as
soon as they have work and the network takes every cycle they leave: alone (the
model-only figure) it runs as fast as before. Measured in BENCHMARKS.md (session 15).

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
    feeding and store-write threads) are not among them."""
    if not LINUX:
        return []
    ours = {thread.native_id for thread in threading.enumerate()}
    try:
        return [tid for tid in map(int, os.listdir("/proc/self/task")) if tid not in ours]
    except OSError:
        return []


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
