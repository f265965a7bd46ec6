"""A Celery app whose one task retries once, for the real worker of tests/test_liveness.py.

Its worker loads workers/liveness.py as pupyl-queue's workers do (the module's signals), and
nothing else: no TensorFlow, no store. The task sends its retry (same task id, a new delivery)
and only then ends, a moment later: the order that a thread pool (ingest workers, embed workers
with PUPYL_EMBED_CONCURRENCY > 1) can always take, made certain here. A second task only answers
its argument (a message fetched by a worker killed before it recorded it, tests/test_liveness.py).
"""

from __future__ import annotations

import time
from typing import Any

import workers.liveness  # noqa: F401 - connects the liveness signals, as in every pupyl worker
from pupyl_queue.celery_app import make_app
from pupyl_queue.settings import Settings

RETRY_ONCE = "pupyl.test.retry_once"
ECHO = "pupyl.test.echo"  # answers its argument: a task that is there or not, nothing else
ENDS_AFTER_S = 1.5  # how long the first run goes on after sending its retry

app = make_app(Settings.from_env(), include_tasks=False)


@app.task(name=RETRY_ONCE, bind=True)  # type: ignore[misc]
def retry_once(self: Any, countdown: float) -> int:
    if self.request.retries == 0:
        retry = self.retry(countdown=countdown, throw=False)  # sent now: the worker receives it at once
        time.sleep(ENDS_AFTER_S)
        raise retry
    return int(self.request.retries)


@app.task(name=ECHO)  # type: ignore[misc]
def echo(value: int) -> int:
    return value
