"""The liveness sweep (issue #16 item 4): it restores a dead worker's delivery once, and never a live one's.

Real redis-server and kombu's real Redis transport; the slow test runs real Celery
workers. Nothing here needs ../shared/data: the tasks are compactions of vectors
made in code (tests/test_dead_worker.py does the same with embed workers and photos).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from pupyl_queue import PupylQueue, Settings, broker_fixes
from pupyl_queue import constants as C
from pupyl_queue.celery_app import make_app
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelSpec
from pupyl_queue.settings import SettingsError
from tests.workers import Workers
from workers.liveness import HOLDERS, UNACKED, Liveness, alive_key

DB = 13


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    settings = Settings(redis_url=redis_url.rsplit("/", 1)[0] + f"/{DB}")
    app = make_app(settings, include_tasks=False)
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    client.flushdb()
    yield app
    client.flushdb()
    client.close()
    app.close()


def take(app: Celery, opened: list[Any]) -> Any:
    """Receive the next maintenance message without acking it, as a worker does (it stays in ``unacked``)."""
    conn = app.connection_for_read()
    opened.append(conn)
    message = conn.default_channel.basic_get(C.QUEUE_MAINTENANCE, no_ack=False)
    assert message is not None
    return message


def test_a_stale_sweeper_leaves_a_redelivered_task_and_its_record_alone(app: Celery) -> None:
    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    sent = app.send_task(C.TASK_COMPACT, kwargs={"collection": "default"})
    opened: list[Any] = []
    try:
        first = take(app, opened)  # the worker that will die
        tag = first.delivery_tag
        dead, live = Liveness(app, "dead@host"), Liveness(app, "live@host")
        sweepers = Liveness(app, "sweeper-1@host"), Liveness(app, "sweeper-2@host")
        dead.hold(tag)  # it never beats again: its alive key is absent
        live.beat()
        stale = sweepers[1].orphans()  # sweeper 2 reads the records...
        assert stale == {tag: "dead@host"}

        # ...sweeper 1 restores the task, and the live worker receives it again, same delivery tag.
        assert [line.split(" ")[0] for line in sweepers[0].sweep()] == [sent.id]
        assert r.llen(C.QUEUE_MAINTENANCE) == 1 and not r.hexists(UNACKED, tag)
        again = take(app, opened)
        assert again.delivery_tag == tag and json.loads(again.body)[1] == {"collection": "default"}
        live.hold(tag)

        # Sweeper 2 acts on its stale view: it must not restore the live worker's task nor erase its record.
        assert sweepers[1].restore(stale) == []
        assert r.llen(C.QUEUE_MAINTENANCE) == 0 and r.hexists(UNACKED, tag)
        assert r.hget(HOLDERS, tag) == "live@host"
        # The worker thought dead was only slow: its task ends, and the live worker's record stays.
        dead.release(tag)
        assert r.hget(HOLDERS, tag) == "live@host"
        live.release(tag)
        assert not r.hexists(HOLDERS, tag)
        assert r.exists(alive_key("live@host"))
    finally:
        for conn in opened:
            conn.release()
        r.close()


def test_two_sweepers_restore_a_dead_workers_task_once(app: Celery) -> None:
    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    app.send_task(C.TASK_COMPACT, kwargs={"collection": "default"})
    opened: list[Any] = []
    try:
        tag = take(app, opened).delivery_tag
        Liveness(app, "dead@host").hold(tag)
        one, two = Liveness(app, "sweeper-1@host"), Liveness(app, "sweeper-2@host")
        views = one.orphans(), two.orphans()  # both saw it orphaned
        assert len(one.restore(views[0]) + two.restore(views[1])) == 1
        assert r.llen(C.QUEUE_MAINTENANCE) == 1  # on its queue once, not twice
    finally:
        for conn in opened:
            conn.release()
        r.close()


@pytest.mark.parametrize("recorded", ["nowhere else", "in unacked", "in unacked and the record"])
def test_a_dead_workers_landed_message_comes_back_once(app: Celery, recorded: str) -> None:
    """A message in a dead worker's landing list (broker_fixes.py, item 4), killed before kombu
    recorded it, between kombu's record and the liveness record, or after both (a solo worker
    runs its task inside the hand-over): one sweep puts it back on its queue exactly once, and
    nothing is left in ``unacked`` for kombu's own restore to bring back a second time."""
    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    app.send_task(C.TASK_COMPACT, kwargs={"collection": "default"})
    opened: list[Any] = []
    try:
        tag = take(app, opened).delivery_tag  # now in unacked, as kombu records a fetched message
        payload = json.loads(r.hget(UNACKED, tag))[0]  # the message as its queue held it
        landing = broker_fixes.landing_key("dead@host", C.QUEUE_MAINTENANCE)
        r.rpush(landing, json.dumps(payload))
        r.hset(broker_fixes.LANDINGS, landing, json.dumps(["dead@host", C.QUEUE_MAINTENANCE]))
        if recorded == "nowhere else":
            r.hdel(UNACKED, tag)
        elif recorded == "in unacked and the record":
            Liveness(app, "dead@host").hold(tag)
        Liveness(app, "sweeper@host").sweep()
        queued = [json.loads(m)["properties"]["delivery_tag"] for m in r.lrange(C.QUEUE_MAINTENANCE, 0, -1)]
        assert queued == [tag]  # back once, not twice
        assert not r.hexists(UNACKED, tag) and not r.exists(landing)
        assert not r.hexists(broker_fixes.LANDINGS, landing) and not r.hexists(HOLDERS, tag)
    finally:
        for conn in opened:
            conn.release()
        r.close()


def test_alive_keys_live_for_the_setting_and_beats_fit_three_times_in_it(app: Celery) -> None:
    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    default, short = Liveness(app, "default@host"), Liveness(app, "short@host", alive_s=6)
    try:
        assert (default.alive_s, default.beat_s) == (Settings().worker_alive_s, 5) == (30, 5)
        assert short.beat_s == 2
        default.beat()
        short.beat()
        assert 25 < r.ttl(alive_key("default@host")) <= 30
        assert 0 < r.ttl(alive_key("short@host")) <= 6
        with pytest.raises(SettingsError, match="PUPYL_WORKER_ALIVE_S"):
            Settings(worker_alive_s=2)
    finally:
        for live in (default, short):
            live.close()
        r.close()


@pytest.mark.slow
def test_killed_maintenance_workers_task_comes_back_without_waiting_hours(
    redis_url: str, tmp_path: Path
) -> None:
    import numpy as np

    from pupyl_queue import integrity
    from pupyl_queue.codecs import encode_segment
    from pupyl_queue.coordination import Coordinator
    from pupyl_queue.models import normalize
    from pupyl_queue.store import open_store

    # The sweep restores ~10 s after the kill (the default 30 s takes the same path). A kill that lands
    # after the compaction took its lock leaves that lock behind: it lapses first (6 s), so the
    # restored compaction runs instead of answering "another compaction is running".
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + f"/{DB}",
        worker_alive_s=10,
        compact_lock_s=6,
    )
    assert settings.visibility_timeout >= 3600  # kombu alone would bring the task back in hours
    client = PupylQueue(settings=settings)
    client.redis.flushdb()
    layout, dim = Layout(), 128
    client.redis.set(layout.key("model"), json.dumps(ModelSpec("characteristic", dim, 224, 1).to_json()))
    coord, store = Coordinator(client.redis, layout), open_store(settings)
    rng = np.random.default_rng(0)
    for b in range(40):  # 80k vectors: a compaction long enough to be killed in
        ids = coord.allocate_ids(f"b{b}", 2000)
        data = encode_segment(np.array(ids), normalize(rng.normal(size=(2000, dim)).astype(np.float32)))
        store.put(layout.segment(f"b{b:04d}"), data)
        integrity.record_checksum(coord, layout.segment(f"b{b:04d}"), data)
        coord.publish(layout.segment(f"b{b:04d}"), images=2000)
    workers = Workers(settings, tmp_path)
    workers.start(C.QUEUE_MAINTENANCE)
    try:
        result = client.app.send_task(C.TASK_COMPACT, kwargs={"collection": layout.collection})
        deadline = time.monotonic() + 120
        while not client.redis.hlen(HOLDERS):  # received: the liveness record is there
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.01)
        (holder,) = set(client.redis.hvals(HOLDERS))
        assert 0 < client.redis.ttl(alive_key(holder)) <= 10  # the worker took PUPYL_WORKER_ALIVE_S
        workers.procs[C.QUEUE_MAINTENANCE].kill()
        workers.procs.pop(C.QUEUE_MAINTENANCE).wait()
        killed = time.monotonic()
        assert client.redis.hlen(UNACKED) == 1  # unacknowledged: kombu alone restores it in 4 h
        workers.start_extra(C.QUEUE_MAINTENANCE)
        done = result.get(timeout=150)
        took = time.monotonic() - killed
        assert done["watermark"] == coord.last_sequence() and done["count"] == 80_000
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
        assert re.search(rf"restored 1 task\(s\) of dead workers: {result.id} \(delivery ", logs), logs
        # Once, not twice: the sweep that restored it from the record found the dead worker's landing
        # list empty (a solo worker runs a task inside its fetch's hand-over; the entry went on receipt).
        received = re.compile(rf"Task {re.escape(C.TASK_COMPACT)}\[{result.id}\] received")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
            assert len(received.findall(logs)) == 2 and not client.redis.llen(C.QUEUE_MAINTENANCE), logs
            time.sleep(0.5)
        assert not any(holder in v for v in client.redis.hvals(broker_fixes.LANDINGS)), "landing list left"
        print(f"\n[liveness] killed maintenance worker: compaction done {took:.1f}s after the kill")
    finally:
        client.close()
        workers.stop_all()
        client.redis.flushdb()


def retry_worker(name: str, settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    """A real worker of tests/retry_app.py, in a thread pool as ingest workers run."""
    command = [sys.executable, "-m", "celery", "-A", "tests.retry_app", "worker", "-Q", C.QUEUE_MAINTENANCE]
    command += ["-P", "threads", "-c", "2", "-n", f"{name}@%h", "--loglevel", "INFO"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": root}
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the worker writes it
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)


class RetryWorkers:
    """Real tests/retry_app.py workers on this module's Redis database, stopped and cleaned up on exit."""

    def __init__(self, redis_url: str, log_dir: Path, worker_alive_s: int) -> None:
        self.log_dir = log_dir
        self.settings = Settings(
            data_dir=log_dir / "data",
            redis_url=redis_url.rsplit("/", 1)[0] + f"/{DB}",
            worker_alive_s=worker_alive_s,
        )
        self.app = make_app(self.settings, include_tasks=False)
        self.r = redis.Redis.from_url(self.settings.broker_url, decode_responses=True)
        self.r.flushdb()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        self.procs[name] = retry_worker(name, self.settings, self.log_dir)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs.pop(name).wait()

    def __enter__(self) -> RetryWorkers:
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGCONT)  # one a test stopped must be able to shut down
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=30)
        self.r.flushdb()
        self.r.close()
        self.app.close()


@pytest.mark.slow
def test_a_retry_received_before_its_first_run_ended_is_restored_when_its_worker_dies(
    redis_url: str, tmp_path: Path
) -> None:
    """A retry is a new delivery of the same task id, received (it waits for its countdown in the
    worker) before the run that sent it ends. Its record must outlive that run's postrun, so that a
    worker killed during the countdown has the retry restored in seconds, not after hours."""
    from tests.retry_app import RETRY_ONCE

    with RetryWorkers(redis_url, tmp_path, worker_alive_s=6) as stack:
        r = stack.r
        stack.start("retry-a")
        result = stack.app.send_task(RETRY_ONCE, kwargs={"countdown": 20})
        deadline = time.monotonic() + 60
        while True:  # the first delivery acked (after its postrun), the retry received and unacked
            unacked = {tag: json.loads(raw)[0] for tag, raw in r.hgetall(UNACKED).items()}
            retries = {tag: body["headers"]["retries"] for tag, body in unacked.items()}
            if list(retries.values()) == [1]:
                break
            assert time.monotonic() < deadline, (retries, (tmp_path / "retry-a.log").read_text())
            time.sleep(0.05)
        (retry_tag,) = retries
        holders = r.hgetall(HOLDERS)
        assert holders.get(retry_tag, "").startswith("retry-a@"), (
            f"the first run's postrun erased the record of its retry's delivery: {holders}"
        )
        assert list(holders) == [retry_tag]  # and the first delivery's record went with its run

        stack.kill("retry-a")
        stack.start("retry-b")
        assert result.get(timeout=90) == 1  # restored by the sweep, run when its countdown is over
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("retry-*.log"))
        assert (
            f"restored 1 task(s) of dead workers: {result.id} (delivery {retry_tag}, held by retry-a@" in logs
        )


@pytest.mark.slow
def test_a_message_fetched_by_a_worker_killed_before_it_recorded_it_comes_back(
    redis_url: str, tmp_path: Path
) -> None:
    """The server pops a message for a worker's pending fetch whether or not the worker reads the reply.

    The worker is stopped (SIGSTOP: its fetch pending, its consumer thread unable to read, as one
    short of the GIL is) when the message is sent, then killed. With kombu's BRPOP the message was
    then nowhere (not queued, not in ``unacked``): lost for good. It must sit in the worker's
    landing list and come back to a live worker once the dead one's alive key lapsed.
    """
    from pupyl_queue.broker_fixes import LANDINGS
    from tests.retry_app import ECHO

    with RetryWorkers(redis_url, tmp_path, worker_alive_s=3) as stack:
        r, procs = stack.r, stack.procs
        stack.start("fetch-a")
        deadline = time.monotonic() + 60
        while not r.hlen(LANDINGS):  # the worker fetches (into its landing list)
            assert time.monotonic() < deadline, (tmp_path / "fetch-a.log").read_text()
            time.sleep(0.05)
        for attempt in range(20):  # until the stopped worker's pending fetch takes the message
            procs["fetch-a"].send_signal(signal.SIGSTOP)
            result = stack.app.send_task(ECHO, kwargs={"value": attempt})
            time.sleep(0.2)
            if not r.llen(C.QUEUE_MAINTENANCE):
                break
            r.delete(C.QUEUE_MAINTENANCE)  # its fetch had timed out just before: not this case
            procs["fetch-a"].send_signal(signal.SIGCONT)
            time.sleep(0.3)
        else:
            pytest.fail("the stopped worker's fetch never took a message")
        assert not r.hlen(UNACKED)  # fetched, never recorded: nothing for kombu or the sweep's tags
        stack.kill("fetch-a")
        stack.start("fetch-b")
        assert result.get(timeout=60) == attempt
        logs = (tmp_path / "fetch-b.log").read_text(errors="replace")
        assert "restored 1 fetched, unrecorded message(s)" in logs, logs
        assert not [k for k in r.hkeys(LANDINGS) if "fetch-a@" in k]  # the dead worker's list went


def test_a_landed_delivery_is_recorded_from_the_copy_redis_holds(app: Celery) -> None:
    """kombu records a delivery by sending the whole message back to Redis (up to ~1.8 MB for an embed
    batch of small images inline), and the landing entry went by value (the message once more). Landed,
    the record is made in Redis from its own copy: the same record kombu writes, a few bytes sent."""
    from kombu import Queue

    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    blob = "x" * 400_000
    app.send_task("pupyl.landing_test", kwargs={"blob": blob}, queue=C.QUEUE_MAINTENANCE)
    queued = json.loads(r.lindex(C.QUEUE_MAINTENANCE, 0))
    seen: dict[str, Any] = {}

    def received(_body: Any, message: Any) -> None:
        tag = message.delivery_tag
        seen.update(message=message, record=r.hget(UNACKED, tag), index=r.zscore("unacked_index", tag))

    broker_fixes.land_as("landing-test@host")
    try:
        with app.connection_for_read() as conn:
            sent_before = int(r.info("stats")["total_net_input_bytes"])
            with conn.Consumer([Queue(C.QUEUE_MAINTENANCE)], callbacks=[received], accept=["json"]):
                conn.drain_events(timeout=10)
            sent = int(r.info("stats")["total_net_input_bytes"]) - sent_before
            message = seen["message"]
            landing = broker_fixes.landing_key("landing-test@host", C.QUEUE_MAINTENANCE)
            assert r.llen(landing) == 0, "the landing entry was left"
            info = message.delivery_info
            assert json.loads(seen["record"]) == [queued, info["exchange"], info["routing_key"]]
            assert seen["index"] is not None
            assert sent < len(blob) // 4, f"{sent} bytes went up to Redis for a {len(blob)}-byte message"
            message.ack()
        assert not r.hlen(UNACKED) and not r.zcard("unacked_index")
    finally:
        broker_fixes.land_as(None)
        r.close()


def test_a_landing_head_that_is_not_the_delivery_is_left_alone(app: Celery) -> None:
    """Recorded from Redis's copy only when the list's head is this delivery (its tag and length):
    otherwise nothing is written or taken, and the caller takes kombu's own way."""
    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    try:
        landing = broker_fixes.landing_key("head-test@host", C.QUEUE_MAINTENANCE)
        tag = "0123456789abcdef-tag"
        message = json.dumps({"properties": {"delivery_tag": tag}, "body": "x" * 100})
        r.lpush(landing, message)
        for landed in (
            broker_fixes.Landed(landing, tag, len(message) + 1),  # another length
            broker_fixes.Landed(landing, "fedcba9876543210-tag", len(message)),  # another tag
        ):
            assert not broker_fixes.record_landed(r, landed, UNACKED, "unacked_index", "", "q")
            assert not broker_fixes.unland_head(r, landed)
        assert not r.hlen(UNACKED) and not r.zcard("unacked_index") and r.llen(landing) == 1
        right = broker_fixes.Landed(landing, tag, len(message))
        assert broker_fixes.record_landed(r, right, UNACKED, "unacked_index", "", "q")
        assert json.loads(r.hget(UNACKED, tag)) == [json.loads(message), "", "q"]
        assert broker_fixes.unland_head(r, right) and not r.exists(landing)
    finally:
        r.close()


def test_bodies_are_json_text_and_other_producers_base64_bodies_still_read(app: Celery) -> None:
    """Our producers put the task's JSON in the envelope as text (``body_encoding`` utf-8, no base64
    of it); a plain Celery producer's message (kombu's default, base64) still reads, landed or not."""
    from kombu import Queue

    r = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    plain = Celery(broker=app.conf.broker_url)
    plain.conf.broker_transport_options = {"priority_steps": [0]}
    try:
        plain.send_task("pupyl.encoding_test", kwargs={"v": "plain"}, queue=C.QUEUE_MAINTENANCE)
        app.send_task("pupyl.encoding_test", kwargs={"v": "ours"}, queue=C.QUEUE_MAINTENANCE)
        queued = [json.loads(raw) for raw in r.lrange(C.QUEUE_MAINTENANCE, 0, -1)]  # newest first
        assert [m["properties"]["body_encoding"] for m in queued] == ["utf-8", "base64"]
        assert json.loads(queued[0]["body"])[1] == {"v": "ours"}
        for owner in ("encoding-test@host", None):  # landed, then kombu's own BRPOP
            broker_fixes.land_as(owner)
            got: list[Any] = []
            with app.connection_for_read() as conn:
                with conn.Consumer(
                    [Queue(C.QUEUE_MAINTENANCE)], callbacks=[lambda _b, m, got=got: got.append(m)]
                ):
                    while len(got) < 2:
                        conn.drain_events(timeout=10)
                for message in got:
                    message.ack()
            assert sorted(m.decode()[1]["v"] for m in got) == ["ours", "plain"]
            if owner:  # the same two again, for kombu's own fetch
                plain.send_task("pupyl.encoding_test", kwargs={"v": "plain"}, queue=C.QUEUE_MAINTENANCE)
                app.send_task("pupyl.encoding_test", kwargs={"v": "ours"}, queue=C.QUEUE_MAINTENANCE)
        assert not r.hlen(UNACKED) and not r.llen(C.QUEUE_MAINTENANCE)
    finally:
        broker_fixes.land_as(None)
        plain.close()
        r.close()
