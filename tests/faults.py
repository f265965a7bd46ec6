"""Helpers of the fault-injection tests: real images, a TCP proxy that can play dead, and the checks.

Nothing here mocks a part of the stack: the proxy forwards real bytes to a real
S3 server and "stops" it by closing its listening socket and every live
connection, so clients see exactly what a dead server gives them (refused
connections, reset sockets).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import select
import shutil
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from pupyl_queue import constants as C
from pupyl_queue.codecs import decode_segment
from pupyl_queue.coordination import Coordinator
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import decode_batch
from pupyl_queue.searcher import Searcher
from pupyl_queue.store import ObjectStore

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers"


def small_flowers(dest: Path, count: int, size: int = 96, copies: int = 0) -> dict[Path, str]:
    """``count`` distinct real photos (the shared flowers set) as small JPEGs, plus ``copies`` exact copies.

    Returns every file written with the sha256 of its bytes. Sources whose small
    JPEG equals one already written are skipped, so the first ``count`` files are
    all distinct; the copies repeat some of them byte for byte under other names.
    """
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted(FLOWERS.rglob("*.jpg"))
    out: dict[Path, str] = {}
    seen: set[str] = set()
    for source in sources:
        if len(out) >= count:
            break
        with Image.open(source) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            continue
        seen.add(sha)
        path = dest / f"{source.parent.name}-{source.stem}.jpg"
        path.write_bytes(data)
        out[path] = sha
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} distinct flowers in {FLOWERS}")
    originals = list(out.items())
    for number in range(copies):
        path, sha = originals[(number * 97) % len(originals)]
        copy = dest / f"copy{number:03d}-{path.name}"
        shutil.copyfile(path, copy)
        out[copy] = sha
    return out


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream; ``down()`` plays a dead server, ``up()`` revives it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self.connections = 0  # accepted while up, in all
        self._accept_thread = self._start_accepting()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        return sock

    def _start_accepting(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: down() or close()
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._live.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._live.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def down(self) -> None:
        """Stop listening (new connections are refused) and cut every live connection."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        self._accept_thread.join(timeout=5)
        with self._lock:
            live = list(self._live)
        self._drop(*live)

    def up(self) -> None:
        """Listen on the same port again."""
        self._listener = self._listen(self.port)
        self._accept_thread = self._start_accepting()

    def close(self) -> None:
        self.down()


# --- worker logs
RECEIVED = re.compile(r"Task pupyl\.embed\[([0-9a-f-]+)\] received")
FINISHED = re.compile(r"Task pupyl\.embed\[([0-9a-f-]+)\] (?:succeeded|retry|raised)")
RETRY = re.compile(r"Task pupyl\.\w+\[[0-9a-f-]+\] retry: Retry in")


def open_tasks(log: str) -> list[str]:
    """Every embed task a worker log shows received and not yet finished, oldest receipt first.

    A solo worker has at most one; a threads-pool worker (PUPYL_EMBED_CONCURRENCY > 1) runs several
    and holds prefetched ones besides, waiting for a thread. Counted per receipt, not per id: a
    retry (or a delivery that came back) is received again under the same task id, and stays open
    until its own end is logged.
    """
    received = RECEIVED.findall(log)
    left = Counter(received)
    left.subtract(FINISHED.findall(log))
    out: list[str] = []
    for task in reversed(received):  # the newest receipts are the open ones
        if left[task] > 0:
            left[task] -= 1
            out.append(task)
    return list(dict.fromkeys(reversed(out)))  # a task id twice open (a retry received early): once


def count_retries(log: str) -> int:
    return len(RETRY.findall(log))


COUNTDOWN = re.compile(r"Task pupyl\.\w+\[([0-9a-f-]+)\] retry: Retry in (\d+)s")


def retry_countdowns(log: str) -> dict[str, list[int]]:
    """Each retried task's countdowns, in order (Celery's backoff: jittered, doubling)."""
    out: dict[str, list[int]] = {}
    for task, seconds in COUNTDOWN.findall(log):
        out.setdefault(task, []).append(int(seconds))
    return out


# --- the exactly-once check
@dataclass
class Audit:
    indexed_ids: list[int]
    duplicates: int
    failed: int
    segment_ids: list[int]
    image_ids: set[int]
    meta_shas: list[str]
    searcher_ids: list[int]
    keys: list[str]
    commit_keys: list[str]


def audit(store: ObjectStore, client: redis.Redis, collection: str, reports: list[dict[str, Any]]) -> Audit:
    """Read back everything a job left: reports, commit log, segments, image objects, metadata, index."""
    layout = Layout(collection)
    coord = Coordinator(client, layout)
    keys = list(store.list(layout.root + "/"))
    commits = coord.commits_after(0)
    segment_ids: list[int] = []
    dim = 1
    for _, key in commits:
        ids, vectors = decode_segment(store.get(key))
        segment_ids.extend(int(i) for i in ids)
        dim = int(vectors.shape[1])
    images = f"{layout.root}/images/"
    image_ids = {int(k[len(images) :].split(".")[0]) for k in keys if k.startswith(images)}
    stored = set(keys)
    metas = [layout.image_meta(i) for i in sorted(image_ids) if layout.image_meta(i) in stored]  # old layout
    batches = [k for k in keys if k.startswith(f"{layout.root}/{C.STORE_META}/")]
    with ThreadPoolExecutor(8) as pool:  # an S3 round trip each
        meta_shas = [json.loads(data)["sha256"] for data in pool.map(store.get, metas)]
        for held in pool.map(lambda key: decode_batch(store.get(key)), batches):
            meta_shas += [meta["sha256"] for meta in held.values()]
    searcher = Searcher(store, coord, layout)
    searcher.load()
    hits = searcher.search(np.ones(dim, np.float32), top=len(searcher) + 10)
    return Audit(
        indexed_ids=[int(r["id"]) for r in reports if r["status"] == "indexed"],
        duplicates=sum(1 for r in reports if r["status"] == "duplicate"),
        failed=sum(1 for r in reports if r["status"] == "failed"),
        segment_ids=segment_ids,
        image_ids=image_ids,
        meta_shas=meta_shas,
        searcher_ids=[i for i, _ in hits],
        keys=keys,
        commit_keys=[key for _, key in commits],
    )


def assert_exactly_once(found: Audit, files: dict[Path, str], layout: Layout) -> None:
    """Every distinct image indexed once, everywhere; every copy a duplicate; nothing else in the store."""
    distinct = set(files.values())
    assert found.failed == 0
    assert len(found.indexed_ids) == len(set(found.indexed_ids)) == len(distinct), "report ids"
    assert found.duplicates == len(files) - len(distinct), "duplicates in the report"
    assert Counter(found.segment_ids) == Counter(found.indexed_ids), "segments vs report"
    assert found.image_ids == set(found.indexed_ids), "image objects vs report (orphans or losses)"
    assert Counter(found.meta_shas) == Counter(distinct), "metadata sha256s vs the distinct files"
    assert Counter(found.searcher_ids) == Counter(found.indexed_ids), "search index vs report"
    staging = f"{layout.root}/staging/"
    assert not [k for k in found.keys if k.startswith(staging)], "staged objects left behind"
    segments = [k for k in found.keys if k.startswith(f"{layout.root}/segments/")]
    assert sorted(segments) == sorted(found.commit_keys), "segments vs the commit log"
    assert len(found.commit_keys) == len(set(found.commit_keys)), "a segment committed twice"
    metas = [k for k in found.keys if k.startswith(f"{layout.root}/{C.STORE_META}/")]
    batch_of = [k.rsplit("/", 1)[-1].rsplit(".", 1)[0] for k in metas + segments]
    assert sorted(batch_of[: len(metas)]) == sorted(batch_of[len(metas) :]), "metadata objects vs segments"
    for key in found.keys:
        kind = key[len(layout.root) + 1 :].split("/")[0]
        kinds = ("manifest.json", "model.keras", "images", "meta", "segments", "jobs")
        assert kind in kinds, f"unexpected {key}"
