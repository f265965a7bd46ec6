"""priority.py: the network's threads are lowered, nothing else, and never raised back."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pupyl_queue import priority
from pupyl_queue.settings import Settings, SettingsError

pytestmark = pytest.mark.skipif(not priority.LINUX, reason="nice is per thread on Linux only")


def _parked_thread() -> tuple[threading.Thread, threading.Event]:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    return thread, release


def test_lower_changes_only_the_threads_named() -> None:
    thread, release = _parked_thread()
    bystander, release_bystander = _parked_thread()
    try:
        assert priority.niceness(thread.native_id) == 0
        assert priority.lower([thread.native_id], 10) == [thread.native_id]
        assert priority.niceness(thread.native_id) == 10
        assert priority.niceness(bystander.native_id) == 0
        assert priority.niceness(threading.get_native_id()) == 0  # the caller's own thread too
        assert os.getpriority(os.PRIO_PROCESS, 0) == 0
    finally:
        release.set()
        release_bystander.set()


def test_lower_never_raises_a_thread_back_and_skips_gone_ones() -> None:
    thread, release = _parked_thread()
    gone, release_gone = _parked_thread()
    gone_id = gone.native_id
    release_gone.set()
    gone.join()
    # join() returns before the system thread has quite ended: wait until it has
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/self/task/{gone_id}") and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        os.setpriority(os.PRIO_PROCESS, thread.native_id, 15)
        assert priority.lower([thread.native_id, gone_id], 10) == []
        assert priority.niceness(thread.native_id) == 15
        assert priority.lower([thread.native_id], 0) == []  # 0: off
    finally:
        release.set()


def test_native_threads_are_none_of_pythons() -> None:
    ours = {t.native_id for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}
    listed = set(map(int, os.listdir("/proc/self/task")))
    native = priority.native_threads()
    assert not ours & set(native)
    assert set(native) == listed - ours


@pytest.mark.parametrize("value", [-1, 20])
def test_network_nice_is_a_nice_value(value: int) -> None:
    with pytest.raises(SettingsError, match="PUPYL_NETWORK_NICE"):
        Settings(network_nice=value)
