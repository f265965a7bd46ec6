"""The compaction lock and its fencing token: a compaction that lost its lock writes and publishes nothing.

A compaction holds a short Redis lock, renewed while it runs. A lock alone does
not make compactions one at a time: a holder that stalls (a long pause, a
network cut from Redis) longer than the lock's lifetime goes on running while a
second compaction takes the lock. Before this module the first one then
published its pointer unconditionally (backwards, or to files the second one's
GC had deleted as "half-written"), and its own GC deleted the second one's
half-written output.

Where the fence lives. The pointer is an object in the store; S3 has no general
compare-and-set (conditional writes are not in every S3 server, nor in the
local store across machines), so the store cannot be the arbiter. Redis is:

- Taking the lock draws a **fencing token** from a per-collection counter
  (``compact-fence``, INCR), and the lock's value is that token. The counter is
  seeded above the version in the published pointer, so tokens stay increasing
  even after Redis lost its data.
- Every write of a compaction (vector files, index, manifest) first checks, in
  one Redis read, that the lock still holds its token; a lapsed lock that nobody
  took meanwhile (the counter has not moved) is simply taken back. Otherwise the
  run stops with :class:`FencedOut`, and its task answers ``skipped``.
- Publishing is a compare-and-set in one Lua script: the lock still holds the
  token, the token is above the last published version (``compact-published``)
  and the watermark does not go back. Only then is the pointer written, carrying
  ``version`` = the token; the publisher re-reads the pointer just before and
  refuses to replace a newer version. Redis's snapshot watermark (what search
  workers watch) only moves forward.
- Each run registers the snapshot folder it writes (``compact-runs``: folder ->
  token) before its first write. GC keeps a folder (and its vector files)
  registered to a newer token (a live run's half-written output) and deletes one
  registered to an older token even if it holds a manifest (a fenced-out run's,
  never published). This replaces an age rule: it needs no clock.

- After publishing, the metadata prune (metadata.py) writes only objects under new names and
  swaps them in, and forgets removed ids, in Lua calls that check the lock still holds the token
  (``Fence.key``): a run fenced out mid-prune changes nothing in Redis, and its late writes are
  orphans that the next prune deletes.

What it does not close: a store write already in flight when the lock lapsed
lands when it lands. The pointer re-read narrows that window for the pointer to
one PUT; a late data file over a published one is caught by the manifest's
checksums (readers fall back, the next compaction rewrites the version).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
local floor = tonumber(ARGV[2])
if token <= floor then
  token = floor + 1
  redis.call('set', KEYS[2], token)
end
redis.call('set', KEYS[1], token, 'px', ARGV[1])
return token
"""

# Ours: extend it. Lapsed, and nobody took it since (the counter is still at our token): ours again.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder and redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
  return 1
end
return 0
"""

_REGISTER = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: lock, published version, snapshot watermark, runs. ARGV: token, watermark, folder.
_CLAIM = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
if tonumber(redis.call('get', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return -2 end
if tonumber(redis.call('get', KEYS[3]) or '0') > tonumber(ARGV[2]) then return -3 end
redis.call('set', KEYS[2], ARGV[1])
if redis.call('hget', KEYS[4], ARGV[3]) == ARGV[1] then redis.call('hdel', KEYS[4], ARGV[3]) end
return 1
"""

_ADVANCE = """
if tonumber(redis.call('get', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1])
end
return redis.call('get', KEYS[1])
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

_CLAIM_REFUSED = {
    -1: "the lock is no longer this run's",
    -2: "a run with a newer fencing token already published",
    -3: "a newer snapshot is already published",
}


class FencedOut(RuntimeError):
    """This compaction lost its lock to another one: it must not write, publish or collect garbage."""


def read_pointer_record(store: ObjectStore, layout: Layout) -> dict[str, Any] | None:
    """The pointer object itself (path, watermark, version; version 0 when written before fencing)."""
    try:
        pointer = json.loads(store.get(layout.snapshot_pointer))
        return {**pointer, "version": int(pointer.get("version", 0))}
    except ObjectNotFound:
        return None
    except (ValueError, TypeError, AttributeError):
        return None  # unreadable: integrity reports it; a new pointer replaces it


class Fence:
    """What a Compactor checks before it writes. This one checks nothing: a Compactor run directly
    (tests, benchmarks, one process), without the lock. CompactionLock is the real one."""

    token = 0
    key = (
        ""  # the lock's Redis key (CompactionLock): a Lua call that must be fenced checks it holds ``token``
    )

    def check(self) -> None:
        pass

    def register(self, folder: str) -> None:
        pass

    def claim(self, watermark: int, folder: str) -> None:
        pass

    def newer_runs(self) -> set[str]:
        return set()

    def dead_runs(self) -> set[str]:
        return set()

    def forget_dead_runs(self) -> None:
        pass


class CompactionLock(Fence):
    """One collection's compaction lock with its fencing token (see the module docstring)."""

    def __init__(self, client: redis.Redis, store: ObjectStore, layout: Layout, ttl_s: float) -> None:
        self.r = client
        self.store = store
        self.layout = layout
        self.ttl_ms = int(ttl_s * 1000)
        self.key = layout.key("compact-lock")
        self.counter = layout.key("compact-fence")
        self.published = layout.key("compact-published")
        self.runs = layout.key("compact-runs")
        self.token = 0

    def _script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        return self.r.eval(source, len(keys), *keys, *args)

    def acquire(self) -> bool:
        """Take the lock if it is free; the token is then above every published pointer's version."""
        pointer = read_pointer_record(self.store, self.layout)
        floor = pointer["version"] if pointer else 0
        self.token = int(self._script(_ACQUIRE, [self.key, self.counter], [self.ttl_ms, floor]))
        return self.token > 0

    def renew(self) -> bool:
        return bool(self._script(_RENEW, [self.key, self.counter], [self.token, self.ttl_ms]))

    @contextmanager
    def renewed(self) -> Iterator[None]:
        """Renew the lock every third of its lifetime while the body runs."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.ttl_ms / 3000):
                try:
                    if not self.renew():
                        log.warning("compaction lock of %s taken by another run", self.layout.collection)
                        return  # the run's next write finds out and stops
                except redis.RedisError as exc:
                    log.warning("could not renew the compaction lock of %s: %s", self.layout.collection, exc)

        thread = threading.Thread(target=renew, name="pupyl-compact-lock", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()

    def check(self) -> None:
        """Raise FencedOut unless the lock still holds this run's token (taken back if it lapsed unused)."""
        if not self.renew():
            raise FencedOut(f"compaction of {self.layout.collection} lost its lock (token {self.token})")

    def register(self, folder: str) -> None:
        """Before the first write into ``snapshots/<folder>``: GC keeps it while this run may write there."""
        if not self._script(_REGISTER, [self.key, self.runs], [self.token, folder]):
            raise FencedOut(f"compaction of {self.layout.collection} lost its lock before writing")

    def claim(self, watermark: int, folder: str) -> None:
        """The compare-and-set that lets this run publish; raises FencedOut when another may have."""
        keys = [self.key, self.published, self.layout.key(C.KEY_SNAPSHOT), self.runs]
        answer = int(self._script(_CLAIM, keys, [self.token, watermark, folder]))
        if answer != 1:
            raise FencedOut(f"not publishing {folder}: {_CLAIM_REFUSED[answer]}")

    def _registered(self) -> dict[str, int]:
        return {name: int(token) for name, token in self.r.hgetall(self.runs).items()}

    def newer_runs(self) -> set[str]:
        """Snapshot folders a run with a newer token may be writing: GC leaves them alone."""
        return {name for name, token in self._registered().items() if token > self.token}

    def dead_runs(self) -> set[str]:
        """Folders of runs fenced out by this one: never published, whatever they hold."""
        return {name for name, token in self._registered().items() if token < self.token}

    def forget_dead_runs(self) -> None:
        dead = self.dead_runs()
        if dead:
            self.r.hdel(self.runs, *dead)

    def release(self) -> None:
        try:
            if not self._script(_RELEASE, [self.key], [self.token]):
                log.warning("compaction lock of %s lapsed before the end of the run", self.layout.collection)
        except redis.RedisError as exc:
            log.warning("could not release the compaction lock of %s: %s", self.layout.collection, exc)


def publish_pointer(
    store: ObjectStore, client: redis.Redis, layout: Layout, fence: Fence, path: str, watermark: int
) -> None:
    """Claim (fenced), re-read the pointer and refuse to move it back, write it, advance Redis's watermark."""
    folder = path.rsplit("/", 1)[-1]
    fence.claim(watermark, folder)
    current = read_pointer_record(store, layout)
    version = fence.token or (current["version"] if current else 0)
    if current and (current["version"] > version or int(current.get("watermark", 0)) > watermark):
        raise FencedOut(f"not publishing {folder}: the pointer already names a newer snapshot ({current})")
    pointer = {"path": path, "watermark": watermark, "version": version}
    store.put(layout.snapshot_pointer, json.dumps(pointer).encode())
    client.eval(_ADVANCE, 1, layout.key(C.KEY_SNAPSHOT), watermark)
