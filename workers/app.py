"""The Celery app. ``celery -A workers.app worker -Q embed`` runs a worker.

Its configuration is pupyl_queue/celery_app.py, shared with producers (which build
theirs without the tasks, and without importing this package).
"""

from __future__ import annotations

from pupyl_queue.celery_app import make_app

__all__ = ["app"]

app = make_app()
