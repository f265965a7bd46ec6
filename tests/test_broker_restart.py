"""A worker's broker writes outside its task body ride out a Redis restart (real redis-server, no mocks).

A threads-pool worker (ingest; embed with PUPYL_EMBED_CONCURRENCY > 1) keeps running its tasks
while the consumer loses and regains the broker, so a task may start or end while Redis is down.
tests/test_faults.py::test_redis_restarted_mid_job finds what goes wrong then in a whole job, by
chance; these tests hit each window on purpose:

    the ack         kombu's two writes (``unacked`` and its index) wait for Redis (broker_fixes.py)
    STARTED         Celery's result write before the body waits for Redis on a worker (celery_app.py)
    producers       fail fast instead: an API request must not hang on a Redis that is down

Each test runs its own redis-server (AOF on) on a free port, stopped and started again for real.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Exchange, Queue

from pupyl_queue import Settings
from pupyl_queue.celery_app import make_app
from pupyl_queue.stack import free_port, start_redis, stop

DOWN_S = 1.5  # how long the broker stays down


class Broker:
    """A private redis-server that can be restarted on the same port and AOF."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = start_redis(directory, self.port)
        self.client = redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.client.connection_pool.disconnect()
        stop(self.proc)  # SIGTERM: redis-server writes out its AOF and exits

    def start(self) -> None:
        self.proc = start_redis(self.directory, self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.BusyLoadingError:  # still reading its AOF
                assert time.monotonic() < deadline
                time.sleep(0.05)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    server = Broker(tmp_path / "redis")
    yield server
    server.client.close()
    stop(server.proc)


def settings_for(broker: Broker, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=broker.url)


def during_restart(broker: Broker, call: Callable[[], object]) -> tuple[object, BaseException | None, float]:
    """Stop the broker, run ``call`` in a thread, start the broker DOWN_S later; (result, error, seconds)."""
    out: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(DOWN_S)
    broker.start()
    thread.join(60)
    assert not thread.is_alive(), "the call never returned"
    return out.get("result"), out.get("error"), float(out["took"])  # type: ignore[arg-type]


def published_and_read(conn: Any, name: str, payload: dict[str, int], no_ack: bool) -> Any:
    """One message published to its own queue ``name`` and read back on the connection's channel."""
    queue = Queue(name, Exchange(name), name)
    channel = conn.default_channel
    conn.Producer(channel).publish(payload, exchange=queue.exchange, routing_key=name, declare=[queue])
    message = queue(channel).get(no_ack=no_ack)
    assert message is not None
    return message


def test_ack_after_connection_loss_waits_for_the_restarted_broker(broker: Broker, tmp_path: Path) -> None:
    """A task that ends while Redis is down still acknowledges its delivery: nothing left in ``unacked``."""
    app = make_app(settings_for(broker, tmp_path), include_tasks=False)  # installs broker_fixes
    with app.connection_for_read() as conn:
        message = published_and_read(conn, "restart-ack", {"batch": 1}, no_ack=False)
        assert message.payload == {"batch": 1}
        assert broker.client.hlen("unacked") == 1  # kombu's copy of the delivery, until the ack

        broker.stop()
        conn.collect()  # what Celery's consumer does on a lost connection; the task runs on
        _, error, _ = during_restart(broker, message.ack)

    assert error is None, f"the ack failed: {error!r}"
    assert broker.client.hlen("unacked") == 0, "the delivery was left unacknowledged"
    assert broker.client.zcard("unacked_index") == 0
    assert broker.client.llen("restart-ack") == 0, "the delivery went back to its queue (it would run twice)"


def test_worker_started_state_waits_for_the_restarted_broker(broker: Broker, tmp_path: Path) -> None:
    """Celery writes STARTED before the body; on a worker that write waits for Redis instead of failing."""
    app = make_app(settings_for(broker, tmp_path))  # a worker's app (its tasks are not imported here)
    broker.stop()
    _, error, took = during_restart(
        broker, lambda: app.backend.store_result("batch-1", {"pid": 1, "hostname": "w"}, "STARTED")
    )
    assert error is None, f"the STARTED write failed: {error!r}"
    assert took >= DOWN_S * 0.9, "the write cannot have gone through while Redis was down"
    meta = json.loads(broker.client.get("celery-task-meta-batch-1") or b"{}")
    assert meta.get("status") == "STARTED", meta


def test_producer_result_reads_fail_fast_while_the_broker_is_down(broker: Broker, tmp_path: Path) -> None:
    """Producers (API, client) keep Celery's behaviour: a connection error, not a wait."""
    app = make_app(settings_for(broker, tmp_path), include_tasks=False)
    assert not app.conf.result_backend_always_retry
    broker.stop()
    with pytest.raises(redis.ConnectionError):
        app.backend.get_task_meta("batch-1")
    broker.start()
    assert app.backend.get_task_meta("batch-1")["status"] == "PENDING"


def test_delivery_read_as_the_broker_goes_down_is_still_recorded(broker: Broker, tmp_path: Path) -> None:
    """kombu records a delivery in ``unacked`` after taking it off its queue: that write waits for Redis.

    The window between the pop and the record cannot be hit from outside, so the record is made by
    hand, with the transport's own QoS, on a delivery taken off the queue with no record (no_ack).
    """
    app = make_app(settings_for(broker, tmp_path), include_tasks=False)  # installs broker_fixes
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        # popped, not recorded: what BRPOP hands kombu
        message = published_and_read(conn, "restart-append", {"batch": 2}, no_ack=True)
        assert broker.client.hlen("unacked") == 0
        broker.stop()
        _, error, _ = during_restart(broker, lambda: channel.qos.append(message, message.delivery_tag))
        assert error is None, f"the record failed: {error!r}"
        assert broker.client.hexists("unacked", message.delivery_tag), "the delivery is lost"
        message.ack()  # the task ran: nothing left behind
    assert broker.client.hlen("unacked") == 0
