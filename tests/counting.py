"""Counting what one embed batch asks of the store and of Redis, against the real ones.

``CountingStore`` is the local store counting its operations per kind of object; ``count_redis``
gives a client of the real Redis whose connections log every round trip (one command, or one
pipeline) with its command names, Lua scripts named by the Coordinator attribute that holds them.
bench/roundtrips.py prints these figures; tests/test_metadata.py holds them to their budget.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import redis
from redis.connection import Connection

from pupyl_queue.coordination import Coordinator
from pupyl_queue.store import LocalStore


class CountingStore(LocalStore):
    """A local store that counts (operation, folder) pairs: ("put", "meta"), ("get", "staging"),
    and in images/ by suffix: ("put", "images/*.jpg")..."""

    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.ops: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _count(self, op: str, key: str) -> None:
        parts = key.split("/")
        folder = parts[2] if len(parts) > 3 and parts[0] == "collections" else parts[0]
        if folder == "images":  # the stored copy (.jpg), its metadata before #15 (.json), the original
            folder = "images/*." + key.rsplit(".", 1)[-1]
        with self._lock:
            self.ops[(op, folder)] += 1

    def put(self, key: str, data: bytes) -> None:
        self._count("put", key)
        super().put(key, data)

    def get(self, key: str) -> bytes:
        self._count("get", key)
        return super().get(key)

    def exists(self, key: str) -> bool:
        self._count("exists", key)
        return super().exists(key)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        super().delete(key)

    def delete_many(self, keys: Any) -> None:
        keys = list(keys)
        if keys:
            self._count("delete_many", keys[0])  # one request (S3 DeleteObjects) per 1,000 keys
        for key in keys:
            LocalStore.delete(self, key)

    def total(self, op: str | None = None) -> int:
        return sum(n for (o, _), n in self.ops.items() if op is None or o == op)


class RoundTrips:
    """The round trips made through ``count_redis``'s client: each a list of command names."""

    def __init__(self) -> None:
        self.log: list[list[str]] = []
        self.scripts: dict[str, str] = {}  # sha1 -> name
        self.lock = threading.Lock()

    def name_scripts(self, coord: Coordinator) -> None:
        for attr, value in vars(coord).items():
            if isinstance(value, redis.commands.core.Script):
                self.scripts[value.sha] = attr.lstrip("_")

    def record(self, commands: list[tuple[Any, ...]]) -> None:
        names = []
        for args in commands:
            name = str(args[0]).upper()
            if name == "EVALSHA" and len(args) > 1:
                name = f"lua:{self.scripts.get(str(args[1]), str(args[1])[:8])}"
            names.append(name)
        with self.lock:
            self.log.append(names)

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def by_first_command(self) -> Counter[str]:
        """Round trips counted by their first command (a pipeline counts once, by its first)."""
        return Counter(names[0] for names in self.log)


def count_redis(url: str) -> tuple[redis.Redis, RoundTrips]:
    trips = RoundTrips()

    class Counting(Connection):
        def send_command(self, *args: Any, **kwargs: Any) -> None:
            trips.record([args])
            super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            commands = list(commands)
            trips.record([tuple(c) for c in commands])
            return super().pack_commands(commands)

    client = redis.Redis.from_url(url, decode_responses=True, connection_class=Counting)
    client.ping()  # the connection's own handshake is not counted against a batch
    trips.clear()
    return client, trips
