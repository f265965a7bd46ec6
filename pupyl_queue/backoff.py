"""Run a call again, with doubling pauses, while the part it needs (Redis) is unreachable.

One loop for the two places a worker rides out a Redis restart: a task body waits in place for
Redis (workers/tasks.py ``riding_out_redis``), and kombu's ack, reject and delivery record wait for
the broker (broker_fixes.py). They differ in their pauses, their deadline and what they log, which
the callers pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retrying(
    call: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    *,
    wait_s: float,
    first_s: float,
    max_s: float,
    on_wait: Callable[[BaseException, float], None] | None = None,
) -> T:
    """``call()``; on one of ``errors`` wait and call again: pauses from ``first_s`` doubling to
    ``max_s``, for at most ``wait_s`` in all. A pause that would end past that deadline is not
    taken: the error is raised. ``on_wait(error, pause)`` runs before each pause (to log or count).
    """
    deadline = time.monotonic() + wait_s
    delay = first_s
    while True:
        try:
            return call()
        except errors as exc:
            if time.monotonic() + delay > deadline:
                raise
            if on_wait is not None:
                on_wait(exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, max_s)
