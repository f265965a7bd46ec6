"""The Celery app's configuration, for workers and producers alike.

``celery -A workers.app worker -Q embed`` runs a worker (workers/app.py builds its app
here). It lives in the package, not in workers/, so a producer builds the same app
without importing workers/ (DESIGN.md principle 12; held by import-linter, pyproject.toml).

JSON only on the wire; late acks, prefetch one and reject on worker loss, so a
task may run twice and every task is idempotent (DESIGN.md principle 5).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pupyl_queue import broker_fixes
from pupyl_queue import constants as C
from pupyl_queue.settings import Settings


def make_app(settings: Settings | None = None, include_tasks: bool = True) -> Celery:
    """A Celery app for these settings; producers pass include_tasks=False (no TensorFlow)."""
    settings = settings or Settings.from_env()
    broker_fixes.install()  # a worker must outlive a Redis restart (see broker_fixes.py)
    app = Celery(
        "pupyl_queue",
        broker=settings.broker_url,
        backend=settings.broker_url,
        include=["workers.tasks", "workers.signals", "workers.liveness"] if include_tasks else [],
        set_as_current=include_tasks,
    )
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # A message whose worker died (kill -9, OOM, lost node) stays unacknowledged in Redis and comes
        # back only when a live worker's sweep finds it older than the visibility timeout. Kombu sweeps
        # every 10 s x 10 (throttle) by default: sweep at a quarter of the timeout (1-60 s) instead, so
        # recovery takes about the visibility timeout and no longer (found by tests/test_faults.py).
        "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
        # One list per queue, not kombu's four (priorities 0, 3, 6, 9; nothing here sets one): a worker
        # then fetches with BRPOPLPUSH into its landing list, which reads one list (broker_fixes.py, 4).
        "priority_steps": [0],
        # The task's JSON goes into the message envelope as JSON text, not base64 of it (kombu's
        # default): an embed batch carries its small images inline, already base64, and a second
        # base64 made its message a third larger and cost an encode in the ingest worker and a
        # decode in the embed worker per batch. Consumers decode each message by its own
        # ``body_encoding``: messages of other producers (base64) still read.
        "body_encoding": "utf-8",
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        task_routes={name: {"queue": queue} for name, queue in C.TASK_ROUTES.items()},
        task_queues=[Queue(q) for q in C.QUEUES],
        task_default_queue=C.QUEUE_MAINTENANCE,
        result_expires=settings.result_expires,
        # Not result_extended: it stores every task's arguments in its result record, so each embed
        # batch (its images, inline) was JSON-encoded into Redis twice more (STARTED and SUCCESS) and
        # read back once: a fifth of the embed worker's CPU with the null extractor (BENCHMARKS.md).
        # A batch's task id is its batch id (jobs.batch_id): what it runs is known without them.
        result_extended=False,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # `celery -A workers.app beat` compacts every collection with new commits on this schedule,
        # and bounds what would grow for good (job records, cut-off uploads, stale query images).
        beat_schedule={
            "compact-all": {"task": C.TASK_COMPACT_ALL, "schedule": float(settings.compact_interval)},
            "housekeep": {"task": C.TASK_HOUSEKEEP, "schedule": float(settings.housekeeping_interval)},
            "sweep-jobs": {"task": C.TASK_SWEEP_JOBS, "schedule": max(10.0, settings.job_stall_s / 4)},
        },
    )
    if include_tasks:
        app.conf.update(worker_backend_retries())
    return app


def worker_backend_retries() -> dict[str, object]:
    """A worker's result writes wait for Redis (C.REDIS_WAIT_S) instead of failing the task.

    Celery writes a task's STARTED state (task_track_started) before the body runs, with one GET
    and one SET that are not retried. A task that starts while Redis is down (a threads-pool worker,
    PUPYL_EMBED_CONCURRENCY > 1, starts its prefetched batch as soon as a thread is free) then fails
    "outside body": its body never runs and Celery acknowledges the delivery as done, or, with Redis
    still down, cannot, and it waits in kombu's ``unacked`` hash for the visibility timeout (found by
    tests/test_faults.py::test_redis_restarted_mid_job). Retrying every backend operation on a
    connection error, as the task bodies do (riding_out_redis), lets the task start once Redis is back.
    Producers (API, client) keep failing fast: a request must not hang on a Redis that is down.
    """
    return {
        "result_backend_always_retry": True,
        "result_backend_max_sleep_between_retries_ms": C.BACKEND_RETRY_SLEEP_MAX_MS,
        # Full jitter: each pause averages half the cap once the backoff reaches it.
        "result_backend_max_retries": C.REDIS_WAIT_S * 2000 // C.BACKEND_RETRY_SLEEP_MAX_MS,
    }
