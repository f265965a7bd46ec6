"""Guards for kombu's Redis transport (5.x): a worker outlives a broker restart and acks what it ran.

1. No crash when the broker goes away. When the broker connection drops while a worker holds an
   unacknowledged delivery (an ``acks_late`` task still running: always the case on the threads
   pool of the ingest workers and of embed workers with PUPYL_EMBED_CONCURRENCY > 1), Celery first
   ``collect()``s the broken connection, which clears the transport's ``client``, then closes it.
   Closing the channel restores the unacknowledged deliveries through a new connection pool whose
   parameters are read from that cleared ``client``: ``AttributeError: 'NoneType' object has no
   attribute 'hostname'``, and the worker exits ("Unrecoverable error"). The task's own ack later
   fails the same way. Found by tests/test_faults.py (Redis restarted while a job was expanding).
   The guard: each channel remembers its connection parameters and uses them when the transport's
   are gone, so the restore (or the late ack) talks to Redis again or fails with an ordinary
   connection error, which kombu and Celery already handle.

2. An ack waits for the broker. An ack (or reject) is two writes to Redis (the ``unacked`` hash and
   its index). While Redis is down it fails at once; Celery logs "Couldn't ack" and the delivery
   stays in ``unacked`` until the visibility timeout (hours) brings it back to run again. On a
   threads pool the tasks in flight keep running through a restart (the consumer reconnects beside
   them), so one that ends while Redis is down lost its ack that way. The ack now tries again with
   backoff for up to C.BROKER_ACK_WAIT_S: both writes are idempotent, and only the task's own
   thread waits (a solo worker's consumer could not fetch anything with Redis down either). Past
   that, the error is raised as before and the visibility timeout is the fallback.

3. A delivery is recorded before it is lost. The consumer's BRPOP takes a message off its queue;
   kombu then records it in ``unacked`` with a separate write. A message popped just as Redis went
   down had that write fail and was gone for good (a batch of 129 never reached the embed worker
   in tests/test_faults.py with PUPYL_EMBED_CONCURRENCY=2, whose consumer fetches while batches
   run). The record waits for the broker like an ack, in the consumer's thread, which could fetch
   nothing from a Redis that is down anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pupyl_queue import constants as C
from pupyl_queue.backoff import retrying

log = logging.getLogger(__name__)


def install() -> None:
    from kombu.transport import redis as transport

    channel = transport.Channel
    if getattr(channel, "_pupyl_guarded", False) or not hasattr(channel, "_connparams"):
        return
    init, connparams = channel.__init__, channel._connparams

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._pupyl_conninfo = args[0].client if args else None
        init(self, *args, **kwargs)

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None and getattr(self, "_pupyl_conninfo", None) is not None:
            self.connection.client = self._pupyl_conninfo  # the closed transport's own settings
        return connparams(self, asynchronous=asynchronous)

    channel.__init__ = __init__
    channel._connparams = _connparams
    _patient_acks(transport.QoS, (transport.redis.ConnectionError, transport.redis.TimeoutError))
    channel._pupyl_guarded = True


def _patient_acks(qos: Any, broker_down: tuple[type[BaseException], ...]) -> None:
    ack, reject, append = qos.ack, qos.reject, qos.append

    def patient_append(self: Any, message: Any, delivery_tag: str) -> None:
        waiting(
            lambda: append(self, message, delivery_tag), broker_down, f"record of delivery {delivery_tag}"
        )

    def patient_ack(self: Any, delivery_tag: str) -> None:
        waiting(lambda: ack(self, delivery_tag), broker_down, f"ack of delivery {delivery_tag}")

    def patient_reject(self: Any, delivery_tag: str, requeue: bool = False) -> None:
        what = f"{'requeue' if requeue else 'reject'} of delivery {delivery_tag}"
        waiting(lambda: reject(self, delivery_tag, requeue=requeue), broker_down, what)

    qos.ack, qos.reject, qos.append = patient_ack, patient_reject, patient_append


def waiting(
    call: Callable[[], None],
    broker_down: tuple[type[BaseException], ...],
    what: str,
    wait_s: float = C.BROKER_ACK_WAIT_S,
) -> None:
    """``call()``, tried again with backoff (0.1 s doubling to 2 s) while the broker is unreachable."""
    waits = 0

    def on_wait(exc: BaseException, _pause: float) -> None:
        nonlocal waits
        if not waits:
            log.warning("broker unreachable (%s): the %s waits for it", exc, what)
        waits += 1

    retrying(call, broker_down, wait_s=wait_s, first_s=0.1, max_s=2.0, on_wait=on_wait)
    if waits:
        log.info("broker back: the %s went through", what)
