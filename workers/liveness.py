"""Dead workers' tasks go back to their queue in seconds, not after the visibility timeout.

With late acks, a task whose worker dies (kill -9, OOM, a lost node) stays unacknowledged in
Redis; kombu only puts it back when it is older than the visibility timeout, which must stay
longer than the longest task (hours: big expansions, compactions). So each worker process
keeps a short-lived "alive" key fresh from a thread, and records each delivery it receives
(its delivery tag -> the worker's name) until the task ends. Every worker sweeps now and then:
a delivery whose holder's key has lapsed is restored to its queue with kombu's own
``restore_by_tag`` (the same transaction kombu uses). A worker that was only slow (no heartbeat
for PUPYL_WORKER_ALIVE_S) gets its task run twice at worst: every task is idempotent.

Why by delivery tag, and why a claim. A restored message keeps its delivery tag, so a task id
or a tag alone cannot tell the dead worker's delivery from the live worker's redelivery. The
record can: a live worker that received the message again wrote its own name over it. Each
restore first claims the record in one atomic step (it still names the dead worker: delete it),
so of two sweepers only one restores, and a sweeper with a stale view finds the record changed
and leaves the live worker's task and record alone. Failures are logged at WARNING: a kombu
upgrade that moved ``unacked`` or ``restore_by_tag`` must not switch the sweep off silently.

Why the worker keys its own deliveries by tag too, not by task id. A task's retry is a new
message with the same task id and a new delivery tag, and a worker receives a retry with a
countdown at once (it waits for its ETA in the worker), often before the run that sent it has
ended: keyed by task id, the retry's record replaced the run's, and the run's postrun then erased
the retry's record, so a worker that died during the countdown left the retry for the visibility
timeout (hours). A batch dispatched again (its task id is its batch id) is the same case. So the
receipt stamps its delivery tag into the request (``DELIVERY``), which the task's postrun reads
back; a count per tag covers the one delivery received twice (restored while this worker was
thought dead, then received again by it).

A message a dead worker had fetched and not yet recorded (not in ``unacked``, so no tag to sweep)
waits in that worker's landing list (pupyl_queue/broker_fixes.py, item 4): the sweep puts those
back too, and a worker that stops puts back its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import task_postrun, task_received, worker_ready, worker_shutdown

from pupyl_queue import broker_fixes
from pupyl_queue import constants as C
from pupyl_queue.settings import Settings

log = logging.getLogger(__name__)
HOLDERS = broker_fixes.HOLDERS  # HASH delivery tag -> name of the worker that received it
ALIVE_TTL_S = Settings.worker_alive_s  # PUPYL_WORKER_ALIVE_S's default (30 s)
BEAT_S = 5  # at most; a shorter lifetime beats 3 times within it
UNACKED = "unacked"  # kombu's Redis transport: HASH delivery tag -> [message, exchange, routing key]
DELIVERY = "pupyl_delivery_tag"  # stamped into a received request: its task's postrun reads it back

# The record still names the worker we saw dead: it is ours to restore (and no one else's now).
_CLAIM = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""
# Every record naming this worker (a clean stop: kombu restores what it had not acked).
_DROP_HOST = """
local gone = 0
local rows = redis.call('hgetall', KEYS[1])
for i = 1, #rows, 2 do
  if rows[i + 1] == ARGV[1] then gone = gone + redis.call('hdel', KEYS[1], rows[i]) end
end
return gone
"""


def alive_key(hostname: str) -> str:
    return f"{C.REDIS_PREFIX}:workers:alive:{hostname}"


def _task_id(raw: str | None) -> str:
    try:
        return str(json.loads(raw or "")[0]["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "?"


class Liveness:
    def __init__(self, app: Any, hostname: str, alive_s: int = ALIVE_TTL_S) -> None:
        self.app = app
        self.hostname = hostname
        self.alive_s = alive_s  # how long this worker's alive key outlives its last beat
        self.beat_s = min(BEAT_S, alive_s / 3)  # beat and sweep this often
        self.redis = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pupyl-liveness", daemon=True)
        self.held: Counter[str] = Counter()  # delivery tag -> runs of it this worker holds
        self._lock = threading.Lock()  # receipts (consumer thread) and postruns (pool threads)
        self._claim = self.redis.register_script(_CLAIM)
        self._drop_host = self.redis.register_script(_DROP_HOST)

    def start(self) -> None:
        self.beat()
        self.thread.start()

    def beat(self) -> None:
        self.redis.set(alive_key(self.hostname), "1", ex=self.alive_s)

    def _run(self) -> None:
        while not self.stop.wait(self.beat_s):
            try:
                self.beat()
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis away, or kombu changed: say so, go on
                log.warning("liveness beat or sweep failed: %s: %s", type(exc).__name__, exc)

    def hold(self, tag: str) -> None:
        """A delivery this worker received: swept back to its queue if this worker dies."""
        with self._lock:
            self.held[tag] += 1
        self.redis.hset(HOLDERS, tag, self.hostname)

    def release(self, tag: str) -> None:
        """A delivery's task ended; only this worker's own record goes (a live worker may hold the
        tag now), and only when no other run of the same delivery is still held here."""
        with self._lock:
            if self.held[tag] > 1:
                self.held[tag] -= 1
                return
            held = self.held.pop(tag, 0)
        if held:
            self._claim(keys=[HOLDERS], args=[tag, self.hostname])

    def orphans(self) -> dict[str, str]:
        """Deliveries held by workers whose alive key lapsed: delivery tag -> that worker's name."""
        holders = self.redis.hgetall(HOLDERS)
        hosts = sorted(set(holders.values()))
        if not hosts:
            return {}
        alive = dict(zip(hosts, self.redis.mget([alive_key(h) for h in hosts])))
        return {tag: host for tag, host in holders.items() if alive[host] is None}

    def restore(self, orphans: dict[str, str]) -> list[str]:
        """Put each orphaned delivery back on its queue, once: a record changed since it was read is left."""
        if not orphans:
            return []
        restored = []
        with self.app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            unacked = (
                qos.unacked_key
            )  # kombu's own name for it, not a copy that an upgrade could leave behind
            for tag, host in orphans.items():
                if not self._claim(keys=[HOLDERS], args=[tag, host]):
                    continue  # another sweeper restored it, or a live worker received it again
                raw = self.redis.hget(unacked, tag)
                if raw is None:
                    continue  # acked (the worker died after its ack) or restored by kombu itself
                qos.restore_by_tag(tag)  # to the consuming end of its queue: next in line
                restored.append(f"{_task_id(raw)} (delivery {tag}, held by {host})")
        if restored:
            log.warning("restored %d task(s) of dead workers: %s", len(restored), ", ".join(restored))
        return restored

    def dead(self, hosts: list[str]) -> set[str]:
        """Those of ``hosts`` whose alive key lapsed."""
        if not hosts:
            return set()
        return {h for h, alive in zip(hosts, self.redis.mget([alive_key(h) for h in hosts])) if alive is None}

    def restore_landed(self, hosts: Callable[[list[str]], set[str]]) -> int:
        """Put back the messages these workers fetched and never recorded (broker_fixes.py, item 4)."""
        back = broker_fixes.restore_landed(self.redis, hosts, UNACKED)
        if back:
            log.warning("restored %d fetched, unrecorded message(s) of stopped or dead workers", back)
        return back

    def sweep(self) -> list[str]:
        """Restore the deliveries of workers that are gone; returns what was restored.

        Landing lists first: one of their messages still in a dead worker's record is left to the
        record's restore, which would otherwise have dropped the record before the landing list
        was read, and the message would have come back twice."""
        self.restore_landed(self.dead)
        return self.restore(self.orphans())

    def close(self) -> None:
        self.stop.set()
        broker_fixes.land_as(None)
        self.restore_landed(lambda hosts: {self.hostname} & set(hosts))  # what it fetched last, unread
        self._drop_host(keys=[HOLDERS], args=[self.hostname])
        self.redis.delete(alive_key(self.hostname))
        self.redis.close()


_liveness: Liveness | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _liveness
    if sender is None:
        return
    _liveness = Liveness(sender.app, sender.hostname, Settings.from_env().worker_alive_s)
    _liveness.start()
    broker_fixes.land_as(sender.hostname)  # alive key set: fetch into a landing list the sweep knows
    try:
        _liveness.sweep()  # a replacement worker frees its predecessor's task at once
    except Exception as exc:  # noqa: BLE001 - the periodic sweep tries again
        log.warning("liveness sweep at start failed: %s: %s", type(exc).__name__, exc)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _liveness is not None:
        try:
            _liveness.close()
        except redis.RedisError as exc:
            log.warning("could not drop this worker's liveness records: %s", exc)


@task_received.connect
def _hold(request: Any = None, **_: Any) -> None:
    """On receipt (in the consumer: solo and thread pools), before the task starts or waits its turn."""
    if _liveness is None or request is None:
        return
    try:
        tag = str(request.message.delivery_tag)
        request.request_dict[DELIVERY] = tag  # becomes the task's request: its postrun finds it
        _liveness.hold(tag)
        broker_fixes.recorded()  # in the record now: off the landing list, before a solo pool runs it
    except (redis.RedisError, AttributeError, TypeError) as exc:
        log.warning("could not record task %s as held: %s", getattr(request, "id", "?"), exc)


@task_postrun.connect
def _release(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """The run of one delivery ended: the tag its receipt stamped into the request says which."""
    if _liveness is None or task is None:
        return
    tag = task.request.get(DELIVERY)
    if tag is None:  # not a delivery this worker recorded (called directly, or eager)
        return
    try:
        _liveness.release(str(tag))
    except redis.RedisError as exc:
        log.warning("could not release task %s (delivery %s): %s", task_id, tag, exc)
