"""A guard for kombu's Redis transport (5.x) against a worker crash when the broker goes away.

When the broker connection drops while a worker holds an unacknowledged delivery (an
``acks_late`` task still running: always the case on the threads pool of the ingest
workers), Celery first ``collect()``s the broken connection, which clears the
transport's ``client``, then closes it. Closing the channel restores the unacknowledged
deliveries through a new connection pool whose parameters are read from that cleared
``client``: ``AttributeError: 'NoneType' object has no attribute 'hostname'``, and the
worker exits ("Unrecoverable error"). The task's own ack later fails the same way.
Found by tests/test_faults.py (Redis restarted while a job was expanding).

The guard: each channel remembers its connection parameters and uses them when the
transport's are gone, so the restore (or the late ack) talks to Redis again or fails
with an ordinary connection error, which kombu and Celery already handle.
"""

from __future__ import annotations

from typing import Any


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
    channel._pupyl_guarded = True
