"""Per-task timings, kept in Redis so the API's /metrics can show the whole cluster.

Workers are many processes on many machines; Prometheus scrapes one API. Each
worker adds its task's duration into cumulative histogram buckets in one Redis
hash (a pipeline of HINCRBY per task: cheap next to any task), and the API turns
that hash into Prometheus histograms. Counts only ever grow, as Prometheus expects.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import redis

from pupyl_queue import constants as C

KEY = f"{C.REDIS_PREFIX}:metrics:tasks"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)
STATES = ("SUCCESS", "FAILURE", "RETRY")


def record_task(client: redis.Redis, task: str, seconds: float, state: str) -> None:
    """Count one finished task run into its histogram and its outcome counter."""
    with client.pipeline(transaction=False) as pipe:
        for bound in BUCKETS:
            if seconds <= bound:
                pipe.hincrby(KEY, f"{task}|le|{_label(bound)}", 1)
        pipe.hincrbyfloat(KEY, f"{task}|sum", seconds)
        pipe.hincrby(KEY, f"{task}|state|{state}", 1)
        pipe.execute()


def read_tasks(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """{task: {"buckets": [(le, cumulative count)], "sum": s, "states": {state: n}}}."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"buckets": {}, "sum": 0.0, "states": {}})
    for field, value in client.hgetall(KEY).items():
        field = field.decode() if isinstance(field, bytes) else field
        task, kind, *rest = field.split("|")
        if kind == "le":
            out[task]["buckets"][rest[0]] = int(value)
        elif kind == "sum":
            out[task]["sum"] = float(value)
        elif kind == "state":
            out[task]["states"][rest[0]] = int(value)
    for stats in out.values():
        stats["buckets"] = [(_label(b), stats["buckets"].get(_label(b), 0)) for b in BUCKETS]
    return dict(out)


def _label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)
