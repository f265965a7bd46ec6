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

4. A fetched message is never only in a socket. BRPOP takes a message off its queue on the server;
   kombu records it in ``unacked`` only once the worker has read the reply. A worker killed in
   between (kill -9, OOM) lost the message for good: not queued, not unacked, so neither kombu's
   visibility timeout nor the liveness sweep could bring it back. A solo worker asks for its next
   message only when idle and reads the reply at once; a threads-pool worker (PUPYL_EMBED_CONCURRENCY
   > 1) asks while it runs batches, and its consumer thread, short of the GIL beside threads that
   load a model or decode, read the reply late: one batch of 129 lost in
   tests/test_faults.py::test_embed_worker_killed_mid_batch_ten_times (the AOF showed the pop and no
   record). The fix is Redis's reliable-queue pattern: a worker that has said who it is
   (``land_as``) fetches with BRPOPLPUSH into its own landing list (one per worker and queue, named
   in the LANDINGS hash), and takes the message off that list once workers/liveness.py has recorded
   the delivery (``recorded()``, on receipt: before a solo pool runs the task inside the hand-over;
   an entry left there for the whole run brought a task killed mid-run back twice, once through the
   record and once from the list). The liveness sweep puts a dead worker's landed messages back on
   their queue (``restore_landed``), except those in its record, which the record's restore brings
   back; one already in ``unacked`` leaves it, so that kombu's own restore cannot run it again.
   BRPOPLPUSH reads one list, so a worker consuming one queue fetches this way (every pupyl worker
   does: ``-Q`` one queue; priority_steps [0] in celery_app.py keeps it one list); anything else
   fetches with kombu's BRPOP as before.

5. A landed delivery is not sent back to Redis. kombu records a delivery by writing the whole
   message again into ``unacked`` (JSON-encoded anew), and the landing entry was taken off by
   value (LREM sends the message once more): an embed batch carries its small images inline (0.32
   MB for 64 of the 128 px flowers, up to ~1.8 MB at PUPYL_INLINE_BATCH_BYTES), so each delivery
   sent it up to Redis twice more and encoded it once more: 5.9 ms of a worker's CPU per such
   message, against 4.1 without (bench/landed_delivery.txt; Redis's own rises 0.7 -> 1.0 ms).
   Redis holds the message already, at the head of the landing list: a Lua call copies it into
   ``unacked`` there (``_RECORD_LANDED``), and another takes the head off (``_UNLAND``), each
   after checking that the head is this delivery (its length and delivery tag). Anything else
   (not landed, or the head is not it) takes kombu's own way, as before.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic, time
from typing import Any

from pupyl_queue import constants as C
from pupyl_queue.backoff import retrying

log = logging.getLogger(__name__)
LANDINGS = f"{C.REDIS_PREFIX}:workers:landings"  # HASH landing list -> [worker name, queue key]
_landing_owner: str | None = None  # this process's worker name, once it fetches into landing lists

HOLDERS = f"{C.REDIS_PREFIX}:workers:holders"  # HASH delivery tag -> worker (workers/liveness.py)
_pending = threading.local()  # the consumer thread's landed delivery, until its receipt is recorded

# Put a landing list's messages back on their queue (the consuming end: next in line), except those
# in the liveness record (HOLDERS: its sweep brings them back); one that kombu had already put in
# ``unacked`` leaves it, so kombu's own restore cannot run it a second time. Then drop the list and
# its entry. KEYS: landing, unacked, queue, LANDINGS, HOLDERS, unacked index.
_RESTORE_LANDED = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local back = 0
for i = #items, 1, -1 do
  local ok, message = pcall(cjson.decode, items[i])
  local tag = nil
  if ok and type(message) == 'table' and type(message['properties']) == 'table' then
    tag = message['properties']['delivery_tag']
  end
  if type(tag) ~= 'string' or redis.call('HEXISTS', KEYS[5], tag) == 0 then
    redis.call('RPUSH', KEYS[3], items[i])
    if type(tag) == 'string' then
      redis.call('HDEL', KEYS[2], tag)
      redis.call('ZREM', KEYS[6], tag)
    end
    back = back + 1
  end
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[4], KEYS[1])
return back
"""


# The landing list's head, if it is the delivery (ARGV[1]: its tag; ARGV[3]: its length in bytes),
# recorded in ``unacked`` as kombu records it: [message, exchange, routing key] (ARGV[4], ARGV[5]:
# those two as JSON), and its time in the index (ARGV[2]). KEYS: landing, unacked, unacked index.
_RECORD_LANDED = """
local v = redis.call('LINDEX', KEYS[1], 0)
if not v or string.len(v) ~= tonumber(ARGV[3]) or not string.find(v, ARGV[1], 1, true) then return 0 end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], '[' .. v .. ',' .. ARGV[4] .. ',' .. ARGV[5] .. ']')
return 1
"""
# The landing list's head off, if it is the delivery (ARGV[1]: tag, ARGV[2]: length). KEYS: landing.
_UNLAND = """
local v = redis.call('LINDEX', KEYS[1], 0)
if not v or string.len(v) ~= tonumber(ARGV[2]) or not string.find(v, ARGV[1], 1, true) then return 0 end
redis.call('LPOP', KEYS[1])
return 1
"""


@dataclass(frozen=True)
class Landed:
    """The delivery the consumer thread is handing over, as it lies at the head of its landing list."""

    landing: str
    tag: str
    size: int  # bytes


def record_landed(
    client: Any, landed: Landed, unacked: str, unacked_index: str, exchange: str, key: str
) -> bool:
    """kombu's record of a delivery (``QoS.append``), made from the copy Redis holds; False (nothing
    written) when the landing list's head is not this delivery."""
    args = [landed.tag, time(), landed.size, json.dumps(exchange), json.dumps(key)]
    return bool(
        client.register_script(_RECORD_LANDED)(keys=[landed.landing, unacked, unacked_index], args=args)
    )


def unland_head(client: Any, landed: Landed) -> bool:
    """The delivery off its landing list's head; False (nothing taken) when the head is not it."""
    return bool(client.register_script(_UNLAND)(keys=[landed.landing], args=[landed.tag, landed.size]))


def landing_key(owner: str, queue_key: str) -> str:
    return f"{C.REDIS_PREFIX}:workers:landing:{owner}:{queue_key}"


def land_as(owner: str | None) -> None:
    """Fetch into landing lists named for this worker from now on (None: kombu's BRPOP again)."""
    global _landing_owner
    _landing_owner = owner


def recorded() -> None:
    """The delivery this consumer thread is handing over is in the liveness record now (HOLDERS):
    its landing entry goes. Called by workers/liveness.py on receipt, before a solo pool runs the
    task inside the hand-over: a landing entry left for the whole run would bring a task killed
    mid-run back twice, once by the record and once from the landing list."""
    unland = getattr(_pending, "unland", None)
    if unland is not None:
        unland()
        _pending.unland = None


def restore_landed(
    client: Any,
    owners: Callable[[list[str]], set[str]],
    unacked: str = "unacked",
    unacked_index: str = "unacked_index",
) -> int:
    """Put back what the workers ``owners`` picks (from all that have landing lists) had fetched
    and not recorded; returns how many messages went back."""
    landings = {
        key: json.loads(value)
        for key, value in ((_text(k), _text(v)) for k, v in client.hgetall(LANDINGS).items())
    }
    gone = owners(sorted({owner for owner, _ in landings.values()}))
    back = 0
    script = client.register_script(_RESTORE_LANDED)
    for key, (owner, queue_key) in landings.items():
        if owner in gone:
            back += int(script(keys=[key, unacked, queue_key, LANDINGS, HOLDERS, unacked_index]))
    return back


def _delivery_tag(payload: Any) -> str:
    """A message's delivery tag, or "" when it has none a Lua call could look for."""
    try:
        tag = payload["properties"]["delivery_tag"]
    except (KeyError, TypeError):
        return ""
    return tag if isinstance(tag, str) and len(tag) >= 16 else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
    broker_down = (transport.redis.ConnectionError, transport.redis.TimeoutError)
    _patient_acks(transport.QoS, broker_down)
    _landing_fetch(channel, transport, broker_down)
    channel._pupyl_guarded = True


def _patient_acks(qos: Any, broker_down: tuple[type[BaseException], ...]) -> None:
    from kombu.transport import virtual

    ack, reject, append = qos.ack, qos.reject, qos.append

    def landed_append(self: Any, message: Any, delivery_tag: str) -> None:
        landed = getattr(_pending, "landed", None)
        if landed is not None and landed.tag == delivery_tag:
            info = message.delivery_info
            channel = self.channel
            with channel.conn_or_acquire() as client:
                args = (channel.unacked_key, channel.unacked_index_key, info["exchange"], info["routing_key"])
                if record_landed(client, landed, *args):
                    virtual.QoS.append(self, message, delivery_tag)  # kombu's own bookkeeping in memory
                    return
        append(self, message, delivery_tag)

    def patient_append(self: Any, message: Any, delivery_tag: str) -> None:
        waiting(
            lambda: landed_append(self, message, delivery_tag),
            broker_down,
            f"record of delivery {delivery_tag}",
        )

    def patient_ack(self: Any, delivery_tag: str) -> None:
        waiting(lambda: ack(self, delivery_tag), broker_down, f"ack of delivery {delivery_tag}")

    def patient_reject(self: Any, delivery_tag: str, requeue: bool = False) -> None:
        what = f"{'requeue' if requeue else 'reject'} of delivery {delivery_tag}"
        waiting(lambda: reject(self, delivery_tag, requeue=requeue), broker_down, what)

    qos.ack, qos.reject, qos.append = patient_ack, patient_reject, patient_append


def _landing_fetch(channel: Any, transport: Any, broker_down: tuple[type[BaseException], ...]) -> None:
    brpop_start, brpop_read = channel._brpop_start, channel._brpop_read

    def _brpop_start(self: Any, timeout: float | None = None) -> None:
        owner = _landing_owner
        if owner is None or self.global_keyprefix or len(self.active_queues) * len(self.priority_steps) != 1:
            return brpop_start(self, timeout)
        (queue,) = self._queue_cycle.consume(1) or [None]
        if queue is None:
            return None
        source = self._q_for_pri(queue, self.priority_steps[0])
        landing = landing_key(owner, source)
        with self.conn_or_acquire() as client:
            # Between fetches the list is empty, unless a reply was lost with its connection (a broker
            # restart, a health check's disconnect): what it holds goes back first (with its entry).
            if client.llen(landing):
                client.register_script(_RESTORE_LANDED)(
                    keys=[landing, self.unacked_key, source, LANDINGS, HOLDERS, self.unacked_index_key]
                )
                self._pupyl_landing_named = None
            if getattr(self, "_pupyl_landing_named", None) != landing:  # the sweep must find it
                client.hset(LANDINGS, landing, json.dumps([owner, source]))
                self._pupyl_landing_named = landing
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._pupyl_landing = (queue, landing)
        timeout = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BRPOPLPUSH", source, landing, timeout or 0)
        return None

    def _brpop_read(self: Any, **options: Any) -> bool:
        landed = getattr(self, "_pupyl_landing", None)
        if landed is None:
            return bool(brpop_read(self, **options))
        self._pupyl_landing = None
        queue, landing = landed
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BRPOPLPUSH", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # what kombu does; a moved message stays landed
                raise
            if not item:
                raise transport.Empty()
            self._queue_cycle.rotate(queue)

            payload = transport.loads(transport.bytes_to_str(item))
            tag = _delivery_tag(payload)
            landed = Landed(landing, tag, len(item)) if tag else None

            def unland() -> None:
                with self.conn_or_acquire() as client:
                    if landed is None or not unland_head(client, landed):
                        client.lrem(landing, 1, item)  # not at the head (or no tag): by value

            _pending.unland = unland  # taken off once the receipt is recorded (recorded())
            _pending.landed = landed  # recorded in ``unacked`` from Redis's copy (landed_append)
            try:
                self.connection._deliver(payload, queue)
            finally:  # not recorded (refused by kombu or Celery, or no liveness): not to come back
                _pending.landed = None
                if getattr(_pending, "unland", None) is not None:
                    _pending.unland = None
                    waiting(unland, broker_down, f"landing list {landing}")
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    channel._brpop_start, channel._brpop_read = _brpop_start, _brpop_read


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
