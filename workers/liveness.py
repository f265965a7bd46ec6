"""Dead workers' tasks go back to their queue in seconds, not after the visibility timeout.

With late acks, a task whose worker dies (kill -9, OOM, a lost node) stays unacknowledged in
Redis; kombu only puts it back when it is older than the visibility timeout, which must stay
longer than the longest task (hours: big expansions, compactions). So each worker process
keeps a short-lived "alive" key fresh from a thread, and records which task it is running. Every
worker sweeps now and then: a task whose holder's key has lapsed is restored to its queue with
kombu's own ``restore_by_tag`` (the same transaction kombu uses). A worker that was only slow
(no heartbeat for ALIVE_TTL_S) gets its task run twice at worst: every task is idempotent.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown

from pupyl_queue import constants as C

log = logging.getLogger(__name__)
HOLDERS = f"{C.REDIS_PREFIX}:workers:holders"  # HASH task id -> hostname of the worker running it
ALIVE_TTL_S = 30
BEAT_S = 5
UNACKED = "unacked"  # kombu's Redis transport: HASH delivery tag -> [message, exchange, routing key]


def alive_key(hostname: str) -> str:
    return f"{C.REDIS_PREFIX}:workers:alive:{hostname}"


class Liveness:
    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self.redis = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pupyl-liveness", daemon=True)

    def start(self) -> None:
        self.beat()
        self.thread.start()

    def beat(self) -> None:
        self.redis.set(alive_key(self.hostname), "1", ex=ALIVE_TTL_S)

    def _run(self) -> None:
        while not self.stop.wait(BEAT_S):
            try:
                self.beat()
                self.sweep()
            except Exception:  # noqa: BLE001 - Redis away: kombu and the task retries handle that
                log.debug("liveness beat failed", exc_info=True)

    def hold(self, task_id: str) -> None:
        self.redis.hset(HOLDERS, task_id, self.hostname)

    def release(self, task_id: str) -> None:
        self.redis.hdel(HOLDERS, task_id)

    def sweep(self) -> list[str]:
        """Restore the tasks of workers that are gone; returns their ids."""
        holders = self.redis.hgetall(HOLDERS)
        hosts = sorted(set(holders.values()))
        if not hosts:
            return []
        alive = dict(zip(hosts, self.redis.mget([alive_key(h) for h in hosts])))
        orphans = {task for task, host in holders.items() if alive[host] is None}
        if not orphans:
            return []
        restored = []
        with self.app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            for tag, raw in self.redis.hgetall(UNACKED).items():
                try:
                    task_id = json.loads(raw)[0]["headers"]["id"]
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
                if task_id in orphans:
                    qos.restore_by_tag(tag)  # to the consuming end of its queue: next in line
                    restored.append(task_id)
        for task_id in orphans:  # restored, or already acked/restored by kombu: either way, done here
            self.redis.hdel(HOLDERS, task_id)
        if restored:
            log.warning("restored %d task(s) of dead workers: %s", len(restored), ", ".join(restored))
        return restored

    def close(self) -> None:
        self.stop.set()
        self.redis.delete(alive_key(self.hostname))
        self.redis.close()


_liveness: Liveness | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _liveness
    if sender is None:
        return
    _liveness = Liveness(sender.app, sender.hostname)
    _liveness.start()
    _liveness.sweep()  # a replacement worker frees its predecessor's task at once


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _liveness is not None:
        _liveness.close()


@task_prerun.connect
def _hold(task_id: str | None = None, **_: Any) -> None:
    if _liveness is not None and task_id:
        try:
            _liveness.hold(task_id)
        except redis.RedisError:
            log.debug("could not record task %s as held", task_id, exc_info=True)


@task_postrun.connect
def _release(task_id: str | None = None, **_: Any) -> None:
    if _liveness is not None and task_id:
        try:
            _liveness.release(task_id)
        except redis.RedisError:
            log.debug("could not release task %s", task_id, exc_info=True)
