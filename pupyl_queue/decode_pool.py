"""Decode in processes beside the embed worker: a pool sized to the host's cores.

Why processes: decoding, hashing, resizing and re-encoding are the per-image CPU
work of an embed worker, and on a GPU host they are the ceiling (the network is
15-30 times faster than the host's decode). Threads of one process share its
GIL and its allocator with the thread that feeds the network; a pool of decode
processes uses every core and leaves the feeding process to feed.

- The processes are started with the ``spawn`` method: forking a process that
  has started TensorFlow or JAX is unsafe (DESIGN.md, pitfalls).
- On a GPU host with more than two cores they are pinned away from core 0, so
  the process that feeds the GPU always has a core of its own.
- The feeding process hands every image of a batch to the pool at once
  (:meth:`DecodePool.submit`) and collects them in order: each process always
  has the next image waiting. Waiting on each image before handing over the
  next, as one thread per core did, left the processes idle for every hand-off
  (on two cores the whole system then moved a quarter of the decode ceiling;
  BENCHMARKS.md, issue 15, session 6).
- Pixels come back as uint8 through shared memory (:class:`PixelSlots`, one
  block per batch, one slot per image; blocks are reused by later batches and
  stay mapped in the decode processes): no pickling of pixel arrays. The bytes
  in and the small :class:`ImageInfo` out go through the pool's pipe; both are
  local to this host, nothing of this reaches Redis.
- With :class:`Copies` a decode process also writes each image's stored copy
  itself, and reads a local path itself (through the same roots check as the
  expansion): the feeding process then never holds those bytes. On a GPU host
  the feeding process is one core that every image passes through; this halved
  its CPU per image (0.60 to 0.26 ms with the GPU settings; BENCHMARKS.md,
  issue 15, session 10).
  Writing the same copy twice (a group decoded again) is harmless: the key and
  bytes are the same.
- To a remote store (S3) a decode process writes its copies through a few
  threads of its own (:data:`COPY_WRITERS`) and decodes the next image
  meanwhile; the group's answer waits for them. A put to S3 waits on the
  network for as long as it costs CPU, or longer: written in line, that wait
  left the process's core idle (BENCHMARKS.md, issue 15, session 18). A local
  store's put does not wait: written in line.
- A decode process exits when the worker that started it dies (even by kill -9).
- A decode process that dies (kill -9, the OOM killer, a crash in a codec)
  breaks the executor: every job in flight fails with ``BrokenProcessPool``.
  The pool then starts fresh processes and those jobs run again. Decoding has no
  side effects, so a job run twice is harmless and nothing is lost; an image
  that breaks the pool :data:`MAX_ATTEMPTS` times fails with its reason.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from pupyl_queue.images import ImageError, ImageInfo, decode
from pupyl_queue.settings import Settings
from pupyl_queue.sources import LocalRefused, Sources
from pupyl_queue.store import ObjectStore, OverlappedWrites, StoreUnavailable, open_store

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class NoRoomForPixels(RuntimeError):
    """The host's shared memory (/dev/shm) cannot hold a batch's pixel block."""


class PixelSlots:
    """A shared-memory block of ``count`` uint8 images of ``size``×``size``×3, one slot per item.

    The feeding process takes one per batch; decode processes write their
    image's pixels into its slot; :meth:`close` gives it back (call it once the
    batch's pixels are no longer used: its views are reused by a later batch).

    Why blocks are reused: a fresh block per batch cost every page of it a
    fault and a zeroing in the decode process that first wrote it, and another
    fault in the feeding process that read it, plus a create, attach and
    unlink: 11-17 ms of CPU per batch of 64 (BENCHMARKS.md, issue 15, session
    11), as much as decoding ten small JPEGs. A block holds ``capacity`` slots
    (at least ``count``; the embed worker passes its batch size, so a job's
    ramp-up batches and its last one take the same blocks as its full ones),
    rounded up to a power of two; at most ``keep`` blocks of a size (the embed
    worker passes the batches it runs at once; :data:`FREE_BLOCKS` otherwise)
    wait for reuse, the others are unlinked, and all are at exit.

    A block's pages are reserved when it is made (``posix_fallocate``): a
    container's /dev/shm is 64 MB unless given more, and a page that does not
    fit would kill the decode process that writes it (SIGBUS), not fail
    cleanly. :class:`NoRoomForPixels` says so at once instead.
    """

    def __init__(self, count: int, size: int, capacity: int = 0, keep: int = 0) -> None:
        self.size = size
        self._block = _blocks.take(_capacity(max(count, capacity)) * size * size * 3, keep or FREE_BLOCKS)
        self.name = self._block.shm.name
        # (name, token): a decode process's attachment is of this block, not of an old one of its name
        self.block = (self.name, self._block.token)
        shape = (count, size, size, 3)
        self.array: np.ndarray | None = np.ndarray(shape, np.uint8, buffer=self._block.shm.buf)

    def close(self) -> None:
        if self.array is None:
            return
        self.array = None
        _blocks.give_back(self._block)


def _capacity(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()


@dataclass(frozen=True)
class _Block:
    shm: shared_memory.SharedMemory
    token: str
    nbytes: int
    keep: int  # blocks of its size kept for reuse when it comes back


class _Blocks:
    """The feeding process's shared-memory blocks that wait for their next batch, by size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[_Block]] = {}
        atexit.register(self.unlink_all)

    def take(self, nbytes: int, keep: int) -> _Block:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        try:
            return self._make(nbytes, keep)
        except NoRoomForPixels:
            self.unlink_all()  # blocks of other sizes waiting for reuse: room for this one?
            return self._make(nbytes, keep)

    @staticmethod
    def _make(nbytes: int, keep: int) -> _Block:
        shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        fd = getattr(shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):  # Linux: reserve every page now
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:  # a file system that cannot reserve: write and see
                    return _Block(shm, uuid.uuid4().hex, nbytes, keep)
                _unlink(shm)
                free = _shm_free()
                raise NoRoomForPixels(
                    f"no room in shared memory for a batch's pixels ({nbytes / 2**20:.0f} MiB needed, "
                    f"{free}): give the worker more (docker: shm_size; Kubernetes: an emptyDir of "
                    f"medium Memory at /dev/shm) or lower PUPYL_BATCH_SIZE ({exc.strerror})"
                ) from None
        return _Block(shm, uuid.uuid4().hex, nbytes, keep)

    def give_back(self, block: _Block) -> None:
        with self._lock:
            free = self._free.setdefault(block.nbytes, [])
            if len(free) < block.keep:
                free.append(block)
                return
        _unlink(block.shm)

    def unlink_all(self) -> None:
        with self._lock:
            blocks = [block for free in self._free.values() for block in free]
            self._free.clear()
        for block in blocks:
            _unlink(block.shm)


def _shm_free() -> str:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return "free space unknown"
    return f"{stats.f_bavail * stats.f_frsize / 2**20:.0f} MiB free in /dev/shm"


def _unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view is still referenced somewhere: the mapping goes when it does
        log.debug("pixel block %s still referenced at close", shm.name)
    shm.unlink()


FREE_BLOCKS = 2  # per size, unless told: the batches an embed worker runs at once by default
_blocks = _Blocks()


Source = bytes | str  # an image's bytes, or (with Copies) a local file's path or an s3:// object to read


@dataclass(frozen=True)
class Copies:
    """Images whose stored copies (and originals) the decode process writes itself.

    ``keys`` holds, per image handed over in that order, its stored copy's key
    and its original's key ("" when originals are not kept). ``settings`` name
    the store and the roots and size limit a local path is read under, for a
    request of ``origin`` (:class:`pupyl_queue.sources.Sources`).
    """

    settings: Settings
    origin: str
    keys: list[tuple[str, str]]

    def only(self, n: int) -> Copies:
        """The same for image ``n`` alone (decoded again on its own after a process died)."""
        return Copies(self.settings, self.origin, [self.keys[n]])


_io: dict[tuple[Settings, str], tuple[ObjectStore, Sources]] = {}


class StoreWriteFailed(RuntimeError):
    """A decode process could not write a stored copy, for a reason other than an unreachable store.

    Carries the reason as text: a store client's own exception may not survive the trip back.
    """


def _process_io(copies: Copies) -> tuple[ObjectStore, Sources]:
    """This decode process's store client and local-file gate for these settings, made once."""
    key = (copies.settings, copies.origin)
    if key not in _io:
        if len(_io) >= 8:  # a process that serves many runtimes (tests): keep the newest few
            _io.pop(next(iter(_io)))
        with _store_errors("opening the store"):
            store = open_store(copies.settings)
        _io[key] = (store, Sources(copies.settings, origin=copies.origin))
    return _io[key]


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """An unreachable store stays StoreUnavailable (transient: the batch is tried again,
    workers/tasks.py); any other store error comes back as StoreWriteFailed with its text."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        raise StoreWriteFailed(f"{what}: {type(exc).__name__}: {exc}") from None


COPY_WRITERS = 4  # a decode process's threads writing to a remote store: puts in flight while it decodes
_copy_writers: ThreadPoolExecutor | None = None


def _copy_writer() -> ThreadPoolExecutor:
    """This decode process's copy-writing threads (made when a remote store first needs them)."""
    global _copy_writers
    if _copy_writers is None:
        _copy_writers = ThreadPoolExecutor(COPY_WRITERS, thread_name_prefix="pupyl-copy")
    return _copy_writers


def _write_copies(store: ObjectStore, keys: tuple[str, str], copy: bytes, original: bytes) -> None:
    key, original_key = keys
    with _store_errors(f"writing {key}"):
        store.put(key, copy)
        if original_key:
            store.put(original_key, original)


def _decode_into(
    data: Source, max_pixels: int, size: int, block: tuple[str, str], slot: int, copies: Copies | None = None
) -> tuple[ImageInfo | None, bytes, str]:
    """Runs in a decode process: decode, hash, squash to ``size``, write the pixels into the slot.

    Returns the image's facts, its normalized copy (empty when the original
    bytes already are one, or when ``copies`` had it stored here) and an error
    (the failure reason, or empty).
    """
    return _decode_group([(data, slot)], max_pixels, size, block, copies)[0]


def _decode_group(
    images: list[tuple[Source, int]],
    max_pixels: int,
    size: int,
    block: tuple[str, str],
    copies: Copies | None = None,
) -> list[tuple[ImageInfo | None, bytes, str]]:
    """:func:`_decode_into` for several images (source, slot) in one call: one hand-off.

    ``block``: the batch's pixel block, (name, token) of :class:`PixelSlots`.
    """
    out: list[tuple[ImageInfo | None, bytes, str]] = []
    store, sources = _process_io(copies) if copies is not None else (None, None)
    writes = OverlappedWrites(store, _copy_writer) if store is not None else None
    for n, (source, slot) in enumerate(images):
        try:
            if isinstance(source, bytes):
                data = source
            elif sources is None:
                raise TypeError("a reference is read in a decode process only with Copies")
            else:
                data = sources.read_reference(source)
            image = decode(data, max_pixels, target=size)
        except (ImageError, LocalRefused) as exc:
            out.append((None, b"", str(exc)))
            continue
        view = np.ndarray(
            (size, size, 3), np.uint8, buffer=_attached(block).buf, offset=slot * size * size * 3
        )
        view[...] = image.pixels(size)
        del view
        normalized = image.normalized_bytes()  # the original bytes when they already are one
        if writes is not None and copies is not None:
            writes.submit(_write_copies, store, copies.keys[n], normalized, data)
            out.append((image.info(), b"", ""))
        else:
            out.append((image.info(), b"" if image.original else normalized, ""))
    if writes is not None:
        writes.wait()  # every copy is stored before the answer says so; the first error is the group's
    return out


_attachments: OrderedDict[tuple[str, str], shared_memory.SharedMemory] = OrderedDict()
ATTACHMENTS_KEPT = 8  # the blocks a feeding process keeps (FREE_BLOCKS per size, a few sizes)


def _attached(block: tuple[str, str]) -> shared_memory.SharedMemory:
    """This decode process's mapping of a pixel block, attached once and kept while it is in use.

    Keyed by the block's token too: a block unlinked by the feeding process stays mapped here
    until it is pushed out, and a new block that got its name must not be mistaken for it.
    """
    found = _attachments.get(block)
    if found is not None:
        _attachments.move_to_end(block)
        return found
    if len(_attachments) >= ATTACHMENTS_KEPT:
        _, oldest = _attachments.popitem(last=False)
        with contextlib.suppress(BufferError):
            oldest.close()
    _attachments[block] = shm = _attach(block[0])
    return shm


def _attach(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    return shared_memory.SharedMemory(name=name)  # untracked by _untracked_attach


def _untracked_attach() -> None:
    """Attaching to a batch's pixel block registers it with the resource tracker on Python < 3.13:
    two messages to the tracker per hand-off, and at exit a warning about "leaked" blocks that the
    feeding process owns and unlinks. A decode process never owns one, so it registers none."""
    if sys.version_info >= (3, 13):
        return  # _attach passes track=False there
    register = resource_tracker.register

    def register_owned(name: str, rtype: str) -> None:
        if rtype != "shared_memory":
            register(name, rtype)

    resource_tracker.register = register_owned


def _start_decoder(cpus: set[int] | None) -> None:
    """Initializer of a decode process: pin it, and make it exit with the worker that started it.

    A worker killed with -9 cannot shut its pool down; its decode processes
    would otherwise wait on the pool's queue for ever.
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    _untracked_attach()
    parent = multiprocessing.parent_process()
    if parent is not None:

        def exit_with_parent() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(0)

        threading.Thread(target=exit_with_parent, daemon=True, name="pupyl-parent-watch").start()


Decoded = tuple[ImageInfo, bytes, np.ndarray]  # an image's facts, normalized copy and pixels


@dataclass
class Decoding:
    """Images handed to the pool together and not yet collected (:meth:`DecodePool.results`)."""

    future: Future[list[tuple[ImageInfo | None, bytes, str]]] | None  # None: broken at submission
    executor: ProcessPoolExecutor
    images: list[tuple[Source, int]]  # (bytes or local path, slot)
    max_pixels: int
    slots: PixelSlots
    copies: Copies | None = None  # stored by the decode process: a decoded image's copy is written


class DecodePool:
    """Decode processes shared by the embed tasks of one worker process; restarts itself when broken."""

    def __init__(self, processes: int, pin: set[int] | None = None) -> None:
        self.processes = processes
        self.pin = pin
        self.restarts = 0
        self._lock = threading.Lock()
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.processes, context, initializer=_start_decoder, initargs=(self.pin,))

    def submit(
        self,
        images: list[tuple[Source, int]],
        max_pixels: int,
        slots: PixelSlots,
        copies: Copies | None = None,
    ) -> Decoding:
        """Hand images (source, slot) to one decode process without waiting; :meth:`results` collects them.

        Why several at once: each hand-off costs the feeding process ~0.15 ms of CPU (pickling,
        the pool's queue threads), as much as decoding a small JPEG. With ``copies`` the process
        also stores each decoded image (see the module's docstring), and a source may be a path.
        """
        executor = self._executor
        try:
            future = executor.submit(_decode_group, images, max_pixels, slots.size, slots.block, copies)
        except RuntimeError:  # broken (BrokenProcessPool), or shut down by another thread's restart
            future = None
        return Decoding(future, executor, images, max_pixels, slots, copies)

    def results(self, decoding: Decoding) -> list[Decoded | ImageError]:
        """Each submitted image's facts, normalized copy and pixels, or the ImageError saying why not.

        A decode process that died while they were in flight broke the pool: the
        pool restarts and each image is decoded again on its own (:meth:`decode`),
        so only an image that breaks it again and again fails.
        """
        attempts = MAX_ATTEMPTS
        if decoding.future is not None:
            try:
                answers = decoding.future.result()
            except BrokenProcessPool:
                log.warning("a decode process died (attempt 1 of %d): restarting", MAX_ATTEMPTS)
                attempts -= 1
            else:
                out: list[Decoded | ImageError] = []
                for answer, (_, slot) in zip(answers, decoding.images):
                    try:
                        out.append(self._collected(answer, decoding.slots, slot))
                    except ImageError as exc:
                        out.append(exc)
                return out
        self._restart(decoding.executor)
        again: list[Decoded | ImageError] = []
        for n, (data, slot) in enumerate(decoding.images):
            copies = decoding.copies.only(n) if decoding.copies is not None else None
            try:
                again.append(self.decode(data, decoding.max_pixels, decoding.slots, slot, attempts, copies))
            except ImageError as exc:
                again.append(exc)
        return again

    def decode(
        self,
        data: Source,
        max_pixels: int,
        slots: PixelSlots,
        slot: int,
        attempts: int = MAX_ATTEMPTS,
        copies: Copies | None = None,
    ) -> tuple[ImageInfo, bytes, np.ndarray]:
        """Decode one image in a decode process and wait for it; its pixels land in ``slots`` at ``slot``.

        Raises ImageError with the failure reason, as :func:`pupyl_queue.images.decode` does.
        """
        for attempt in range(MAX_ATTEMPTS - attempts + 1, MAX_ATTEMPTS + 1):
            executor = self._executor
            try:
                future = executor.submit(
                    _decode_into, data, max_pixels, slots.size, slots.block, slot, copies
                )
                answer = future.result()
            except RuntimeError as exc:  # BrokenProcessPool is one too
                if not isinstance(exc, BrokenProcessPool) and executor is self._executor:
                    raise  # not a pool shut down by another thread's restart: a real error
                log.warning("a decode process died (attempt %d of %d): restarting", attempt, MAX_ATTEMPTS)
                self._restart(executor)
                continue
            return self._collected(answer, slots, slot)
        raise ImageError(f"the decode process died on this image {MAX_ATTEMPTS} times (a codec crash?)")

    @staticmethod
    def _collected(
        answer: tuple[ImageInfo | None, bytes, str], slots: PixelSlots, slot: int
    ) -> tuple[ImageInfo, bytes, np.ndarray]:
        info, normalized, error = answer
        if info is None:
            raise ImageError(error)
        if slots.array is None:
            raise RuntimeError("the batch's pixel slots were closed while it was decoding")
        return info, normalized, slots.array[slot]

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        """Replace a broken executor once, however many threads saw it break."""
        with self._lock:
            if self._executor is broken:
                self._executor = self._start()
                self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The decode processes' ids (started ones; the executor starts them on demand)."""
        return list(getattr(self._executor, "_processes", {}) or {})

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_shared: dict[tuple[int, frozenset[int] | None], DecodePool] = {}
_shared_lock = threading.Lock()


def shared_pool(processes: int, pin: set[int] | None = None) -> DecodePool:
    """This process's decode pool of that size: one per process, however many runtimes ask for it.

    Idle decode processes cost memory (~40 MB each); a process that builds
    several runtimes (tests, an embedded stack) shares one pool between them.
    """
    key = (processes, frozenset(pin) if pin else None)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = DecodePool(processes, pin)
        return found


def default_processes(setting: int) -> int:
    """PUPYL_DECODE_PROCESSES: -1 = one per core, 0 = none (decode in the worker's threads), N = N."""
    return (os.cpu_count() or 1) if setting < 0 else setting


def pinned_cpus(gpus: int) -> set[int] | None:
    """On a GPU host with more than two cores: every core but the first (the feeding process keeps it)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return set(cpus[1:]) if gpus and len(cpus) > 2 else None
