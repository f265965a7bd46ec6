"""One live run of a batch writes its segment and metadata object; any other waits for its commit.

A batch can run twice at once: a task redelivered while its first run is alive (an expansion run
again re-dispatches the batches it had dispatched, while one of them is still retrying through a
store outage; a worker silent past PUPYL_WORKER_ALIVE_S has its task restored elsewhere), and an
embed worker with PUPYL_EMBED_CONCURRENCY > 1 runs the two deliveries side by side. Both used to
find the segment uncommitted, both wrote it, and the one that wrote last, after the other's commit
had recorded the sha256 of its own bytes, left a committed segment that failed its checksum
(BENCHMARKS.md, issue 15): its vectors and rows (``indexed_at``) are never the same bytes twice.

So before it writes, a run claims the segment in Redis (``Coordinator.begin_write``: one Lua call,
in place of the "committed?" check it replaces, so no round trip is added). The claim is a token
with a lease (C.WRITE_CLAIM_S), renewed by a thread every third of it while the run writes, and
the commit that publishes the segment lets it go in the same call (and refuses to commit for a
run whose claim another run holds now). A run that finds the claim held waits: when the holder
commits, it goes on as a rerun does (writes nothing, returns the first run's answer); when the
holder lets go (it failed) or dies (its lease lapses), it takes the claim and writes itself.

Tombstones go the same way (``write_once``): both live runs of a keyed batch retire the ids its
commit replaced at the same moment, and a tombstone's record carries its ``removed_at``. So does
set_attributes' one-row segment and its metadata object (``attributes_updated_at``): two live runs
of one ``update_id`` (queries.py).

What a lease cannot rule out: a holder whose whole process is frozen (SIGSTOP, a paused VM) for
longer than the lease, and that then resumes in the middle of its write. Its commit is refused
(WriteClaimLost), but a put it had in flight may land on the new holder's object.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis

from pupyl_queue import constants as C
from pupyl_queue.coordination import Coordinator, WriteClaimBusy

log = logging.getLogger(__name__)
T = TypeVar("T")


class WriteClaim:
    """This run's claim on writing one store object until its commit (see the module docstring)."""

    def __init__(
        self,
        coord: Coordinator,
        store_key: str,
        lease_s: float = C.WRITE_CLAIM_S,
        wait_s: float = C.WRITE_CLAIM_WAIT_S,
    ) -> None:
        self.coord = coord
        self.store_key = store_key
        self.token = uuid.uuid4().hex
        self.lease_ms = max(1, int(lease_s * 1000))
        self.wait_s = wait_s
        self.held = False
        self.waited_s = 0.0  # how long another run's claim kept this one waiting
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def acquire(self) -> bool:
        """True: this run holds the claim and writes; False: the object is committed (write nothing).

        Waits while another live run holds it; raises WriteClaimBusy past ``wait_s`` (transient:
        the task is retried, and finds the batch committed or the claim free).
        """
        started = time.monotonic()
        pause = 0.05
        while True:
            state = self.coord.begin_write(self.store_key, self.token, self.lease_ms)
            if state <= 0:
                self.waited_s = time.monotonic() - started
                if self.waited_s > 1:
                    log.info("%s: waited %.1fs for another run's write claim", self.store_key, self.waited_s)
                if state < 0:
                    return False
                self._hold()
                return True
            if time.monotonic() - started > self.wait_s:
                held = f"another run has held its write claim for {self.wait_s:.0f}s"
                raise WriteClaimBusy(f"{self.store_key}: {held}")
            time.sleep(min(pause, state / 1000))
            pause = min(2 * pause, 1.0)

    def _hold(self) -> None:
        self.held = True
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="pupyl-write-claim", daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        every = self.lease_ms / 3000
        while not self._stop.wait(every):
            try:
                if not self.coord.keep_write(self.store_key, self.token, self.lease_ms):
                    log.warning("%s: this run's write claim lapsed and another run took it", self.store_key)
                    return
            except redis.RedisError as exc:  # Redis away a moment: the lease outlives a few misses
                log.warning("%s: could not renew the write claim: %s", self.store_key, exc)

    def _stop_keeping(self) -> None:
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join()
        self._keeper = None

    def committed(self) -> None:
        """The commit let the claim go in its own call: stop renewing it."""
        self._stop_keeping()
        self.held = False

    def release(self) -> None:
        """Let the claim go without a commit (this run failed): a waiting run takes it at once."""
        if not self.held:
            return
        self._stop_keeping()
        self.held = False
        try:
            self.coord.keep_write(self.store_key, self.token, 0)
        except redis.RedisError as exc:  # its lease ends it soon enough
            log.warning("%s: could not let the write claim go: %s", self.store_key, exc)


def write_once(
    coord: Coordinator,
    store_key: str,
    write: Callable[[], str],
    publish: Callable[[str | None, str | None], T],
) -> T:
    """Write ``store_key`` (``write()`` returns its sha256) only while holding its claim, then
    ``publish(checksum, writer)``; a run that finds it committed writes nothing and publishes with
    neither (and gets the first run's answer). For objects written and committed in one go
    (tombstones); ``publish`` must commit ``store_key`` with ``writer``, which lets the claim go.
    """
    claim = WriteClaim(coord, store_key)
    writing = claim.acquire()  # one round trip, as the "committed?" check it replaces
    try:
        checksum = write() if writing else None
        result = publish(checksum, claim.token if writing else None)
    except BaseException:
        claim.release()
        raise
    claim.committed()
    return result
