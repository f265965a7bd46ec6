"""Celery app, tasks and worker entry points of pupyl-queue."""
