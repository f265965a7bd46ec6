"""pupyl_queue.backoff.retrying: the one wait-and-call-again loop of riding_out_redis and broker_fixes."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pupyl_queue.backoff import retrying


def flaky(failures: int) -> tuple[list[float], Callable[[], int]]:
    """A call that raises ConnectionError ``failures`` times, then answers 42; the times it was called."""
    calls: list[float] = []

    def call() -> int:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise ConnectionError(f"down ({len(calls)})")
        return 42

    return calls, call


def test_pauses_double_to_their_cap_and_the_answer_comes_back() -> None:
    calls, call = flaky(4)
    waits: list[tuple[str, float]] = []
    answer = retrying(
        call,
        (ConnectionError,),
        wait_s=5,
        first_s=0.01,
        max_s=0.03,
        on_wait=lambda exc, pause: waits.append((str(exc), pause)),
    )
    assert answer == 42 and len(calls) == 5
    assert waits == [("down (1)", 0.01), ("down (2)", 0.02), ("down (3)", 0.03), ("down (4)", 0.03)]
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert all(gap >= pause for gap, (_, pause) in zip(gaps, waits))


def test_past_the_deadline_the_error_is_raised_and_others_at_once() -> None:
    calls, call = flaky(1000)
    with pytest.raises(ConnectionError):
        retrying(call, (ConnectionError,), wait_s=0.1, first_s=0.02, max_s=0.02)
    assert 3 <= len(calls) <= 7  # pauses of 0.02 s within 0.1 s, none that would end past it

    def broken() -> None:
        calls.append(0.0)
        raise ValueError("a bug, not an outage")

    calls.clear()
    with pytest.raises(ValueError):
        retrying(broken, (ConnectionError,), wait_s=5, first_s=0.01, max_s=0.01)
    assert len(calls) == 1
