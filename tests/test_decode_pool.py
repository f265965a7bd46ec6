"""Decode processes beside the embed worker: same pixels as in-process decode, and kill -9 loses nothing."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
from PIL import Image

from pupyl_queue import decode_pool
from pupyl_queue.decode_pool import Copies, DecodePool, PixelSlots, StoreWriteFailed
from pupyl_queue.images import ImageError, decode
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.sources import OUTSIDE_ROOTS
from pupyl_queue.store import LocalStore, StoreUnavailable, open_store
from tests.conftest import s3_store
from tests.faults import assert_exactly_once, audit
from tests.imagegen import encode, pattern
from tests.indexing import index_folder

LIMIT = 10_000_000


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    decoder = DecodePool(2)
    yield decoder
    decoder.close()


def test_pool_gives_the_pixels_and_facts_of_in_process_decode(pool: DecodePool) -> None:
    sources = [encode(pattern(seed), fmt) for seed, fmt in enumerate(["JPEG", "PNG", "GIF", "WEBP"])]
    slots = PixelSlots(len(sources), 64)
    try:
        for slot, data in enumerate(sources):
            info, normalized, pixels = pool.decode(data, LIMIT, slots, slot)
            here = decode(data, LIMIT, target=64)
            assert info == here.info()
            np.testing.assert_array_equal(pixels, here.pixels(64))
            assert normalized == (b"" if here.original else here.normalized_bytes())
        with pytest.raises(ImageError, match="not an image"):
            pool.decode(b"not an image at all", LIMIT, slots, 0)
        with pytest.raises(ImageError, match="decompression bomb guard"):
            pool.decode(sources[1], 100, slots, 0)
    finally:
        slots.close()


def test_a_group_handed_over_at_once_fails_only_its_bad_image(pool: DecodePool) -> None:
    """Images go to the processes in groups (one hand-off each): a bad one fails alone, in its place."""
    good = [encode(pattern(seed), fmt) for seed, fmt in enumerate(["JPEG", "PNG", "WEBP"])]
    sources = [good[0], b"not an image at all", good[1], good[2]]
    slots = PixelSlots(len(sources), 48)
    try:
        first = pool.submit([(sources[0], 0), (sources[1], 1)], LIMIT, slots)
        second = pool.submit([(sources[2], 2), (sources[3], 3)], LIMIT, slots)
        answers = pool.results(first) + pool.results(second)
        assert isinstance(answers[1], ImageError) and "not an image" in str(answers[1])
        for slot in (0, 2, 3):
            info, _, pixels = answers[slot]  # type: ignore[misc]
            here = decode(sources[slot], LIMIT, target=48)
            assert info == here.info()
            np.testing.assert_array_equal(pixels, here.pixels(48))
            np.testing.assert_array_equal(slots.array[slot], here.pixels(48))  # type: ignore[index]
    finally:
        slots.close()


def test_a_pixel_block_is_reused_by_the_next_batch_and_its_new_pixels_are_read(pool: DecodePool) -> None:
    """Blocks go back to a free list (no fault and zeroing of every page per batch) and decode
    processes keep them mapped: a later batch in the same block sees its own pixels, not the old."""
    first_images = [encode(pattern(seed), "PNG") for seed in range(3)]
    later_images = [encode(pattern(seed), "JPEG") for seed in range(10, 14)]
    first = PixelSlots(len(first_images), 32)
    block = first.block
    answers = pool.results(pool.submit([(d, n) for n, d in enumerate(first_images)], LIMIT, first))
    assert all(not isinstance(a, ImageError) for a in answers)
    first.close()
    later = PixelSlots(len(later_images), 32)  # 4 slots; 3 rounded up to 4: the same block
    try:
        assert later.block == block
        for _ in range(2):  # twice: the second time both decode processes may hold it mapped
            answers = pool.results(pool.submit([(d, n) for n, d in enumerate(later_images)], LIMIT, later))
            for n, data in enumerate(later_images):
                np.testing.assert_array_equal(later.array[n], decode(data, LIMIT, target=32).pixels(32))  # type: ignore[index]
                np.testing.assert_array_equal(answers[n][2], later.array[n])  # type: ignore[index]
    finally:
        later.close()
    held = [PixelSlots(4, 32) for _ in range(4)]  # more at once than the free list keeps
    assert len({slots.block for slots in held}) == 4
    for slots in held:
        slots.close()
    names = {slots.name for slots in held}
    assert sum(Path("/dev/shm", name.lstrip("/")).exists() for name in names) == 2  # FREE_BLOCKS kept
    # An embed worker running 3 batches at once keeps 3 (PUPYL_EMBED_CONCURRENCY: ``keep``).
    held = [PixelSlots(4, 24, keep=3) for _ in range(4)]
    for slots in held:
        slots.close()
    assert sum(Path("/dev/shm", s.name.lstrip("/")).exists() for s in held) == 3


def test_a_block_is_sized_for_the_workers_batches_and_its_pages_are_reserved() -> None:
    """A ramp-up batch (8 of 64) takes a block of the full batch's size (one size class, reused);
    its pages are allocated at once, so /dev/shm running out fails here, not as a SIGBUS later."""
    small = PixelSlots(8, 32, capacity=64)
    name, nbytes = small.name, 64 * 32 * 32 * 3
    small.close()
    full = PixelSlots(64, 32, capacity=64)
    try:
        assert full.name == name
        assert os.stat(Path("/dev/shm", name.lstrip("/"))).st_blocks * 512 >= nbytes
    finally:
        full.close()


def test_no_room_in_shared_memory_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pupyl_queue.decode_pool import NoRoomForPixels

    tried: list[str] = []

    def full(fd: int, offset: int, length: int) -> None:
        tried.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(NoRoomForPixels, match="shm_size.*PUPYL_BATCH_SIZE"):
        PixelSlots(7, 48, capacity=4096)  # a size no other test uses: none waits for reuse
    assert len(tried) == 2  # once more after the blocks waiting for reuse were let go
    assert not any(Path(path).exists() for path in tried)  # the blocks it tried are gone


def test_a_batch_with_no_room_in_shared_memory_decodes_in_threads(
    redis_url: str,
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(5):
        (folder / f"{n}.png").write_bytes(encode(pattern(n + 40), "PNG"))
    rt = Runtime(
        Settings(data_dir=tmp_path / "data", redis_url=redis_url, decode_processes=2, batch_size=4096)
    )
    monkeypatch.setattr(os, "posix_fallocate", full)
    items = index_folder(rt, folder, tiny_model, "noshm")
    assert [i["status"] for i in items] == ["indexed"] * 5
    assert "no room in shared memory" in caplog.text and "decodes in the worker's threads" in caplog.text


def test_a_group_in_flight_when_its_process_dies_is_decoded_again(pool: DecodePool) -> None:
    data = [encode(pattern(seed), "PNG") for seed in range(11, 14)]
    slots = PixelSlots(len(data), 32)
    try:
        pool.decode(data[0], LIMIT, slots, 0)  # the processes exist now
        before = pool.restarts
        for pid in pool.pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        handed = pool.submit([(d, n) for n, d in enumerate(data)], LIMIT, slots)
        answers = pool.results(handed)
        assert pool.restarts == before + 1
        for n, answer in enumerate(answers):
            np.testing.assert_array_equal(answer[2], decode(data[n], LIMIT, target=32).pixels(32))  # type: ignore[index]
    finally:
        slots.close()


def test_killed_decode_process_is_replaced_and_the_image_decoded(pool: DecodePool) -> None:
    data = encode(pattern(7), "PNG")
    slots = PixelSlots(1, 32)
    try:
        pool.decode(data, LIMIT, slots, 0)  # the processes exist now
        before = pool.restarts
        os.kill(pool.pids()[0], signal.SIGKILL)
        _, _, pixels = pool.decode(data, LIMIT, slots, 0)
        np.testing.assert_array_equal(pixels, decode(data, LIMIT, target=32).pixels(32))
        assert pool.restarts == before + 1
    finally:
        slots.close()


def test_a_decode_process_stores_the_copies_and_reads_paths_through_the_roots_check(
    pool: DecodePool, tmp_path: Path
) -> None:
    """With Copies, the copies land in the store under their keys (the original too, when kept), and
    a path is read there under the same rules as the expansion: outside the roots, it fails alone."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    jpeg, png = encode(pattern(21), "JPEG"), encode(pattern(22), "PNG")
    (inside / "a.png").write_bytes(png)
    (outside / "b.jpg").write_bytes(jpeg)
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=str(inside))
    keys = [("c/images/0.jpg", "c/originals/0"), ("c/images/1.jpg", "c/originals/1"), ("c/images/2.jpg", "")]
    sources = [jpeg, str(inside / "a.png"), str(outside / "b.jpg")]
    slots = PixelSlots(len(sources), 40)
    try:
        handed = pool.submit(
            [(s, n) for n, s in enumerate(sources)], LIMIT, slots, Copies(settings, "network", keys)
        )
        answers = pool.results(handed)
    finally:
        slots.close()
    store = open_store(settings)
    assert store.get("c/images/0.jpg") == jpeg  # a plain JPEG is its own stored copy
    assert store.get("c/images/1.jpg") == decode(png, LIMIT).normalized_bytes()
    assert store.get("c/originals/0") == jpeg and store.get("c/originals/1") == png
    assert isinstance(answers[2], ImageError) and str(answers[2]) == OUTSIDE_ROOTS
    assert not store.exists("c/images/2.jpg")
    for n, data in enumerate((jpeg, png)):
        info, normalized, _ = answers[n]  # type: ignore[misc]
        assert info == decode(data, LIMIT).info() and normalized == b""  # nothing comes back to write


def test_a_copy_the_decode_process_cannot_write_fails_the_group_not_one_item(
    pool: DecodePool, tmp_path: Path
) -> None:
    """A store write is not an image's fault: the error reaches the batch, with the key it could not
    write, as the worker's own failed write did (an unreachable store stays StoreUnavailable, which
    the batch retries), instead of turning into a failed item."""
    settings = Settings(data_dir=tmp_path / "data")
    blocked = Path(urlparse(settings.store_url).path) / "c" / "images"
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"a file where the folder goes")
    slots = PixelSlots(1, 32)
    try:
        copies = Copies(settings, "network", [("c/images/0.jpg", "")])
        handed = pool.submit([(encode(pattern(5), "PNG"), 0)], LIMIT, slots, copies)
        with pytest.raises(StoreWriteFailed, match="c/images/0.jpg"):
            pool.results(handed)
    finally:
        slots.close()


def test_decode_processes_write_the_copies_to_s3_through_their_threads(
    pool: DecodePool, s3_endpoint: str
) -> None:
    """Real decode processes and a real S3 server: every decoded image's copy is in the store once the
    group has answered, a bad image fails alone. (That the answer waits for held puts, and that an
    unreachable store fails the group, is checked on ``_decode_group`` itself below.)"""
    settings = Settings(**s3_store(s3_endpoint, f"s3://copies-{os.getpid()}/run"))
    sources = [encode(pattern(30 + n), "JPEG" if n % 2 else "PNG") for n in range(10)] + [b"not an image"]
    keys = [(f"c/images/{n}.jpg", "") for n in range(len(sources))]
    slots = PixelSlots(len(sources), 40)
    try:
        handed = pool.submit(
            [(s, n) for n, s in enumerate(sources)], LIMIT, slots, Copies(settings, "network", keys)
        )
        answers = pool.results(handed)
        store = open_store(settings)
        for n, data in enumerate(sources[:-1]):
            assert store.get(f"c/images/{n}.jpg") == decode(data, LIMIT).normalized_bytes()
        assert isinstance(answers[-1], ImageError) and not store.exists(f"c/images/{len(sources) - 1}.jpg")
    finally:
        slots.close()


class _RemoteStore(LocalStore):
    """A local directory that says it is remote; its puts record their thread and may fail or wait."""

    remote = True

    def __init__(self, root: Path, fail: str = "", hold: threading.Event | None = None) -> None:
        super().__init__(root)
        self.fail, self.hold, self.threads = fail, hold, set[str]()

    def put(self, key: str, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        if self.hold is not None:
            assert self.hold.wait(10)
        if key == self.fail:
            raise StoreUnavailable("the store went away")
        super().put(key, data)


def test_copies_to_a_remote_store_are_written_in_threads_and_the_first_error_is_the_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_decode_group`` itself (as a decode process runs it): a remote store's puts leave the calling
    thread, the group waits for held puts, and an unreachable store fails the group, not an item."""
    settings = Settings(data_dir=tmp_path / "data")
    sources = [encode(pattern(40 + n), "PNG") for n in range(6)]
    keys = [(f"c/images/{n}.jpg", "") for n in range(len(sources))]
    slots = PixelSlots(len(sources), 32)
    try:
        hold = threading.Event()
        store = _RemoteStore(tmp_path / "held", hold=hold)
        monkeypatch.setattr(decode_pool, "_process_io", lambda copies: (store, None))
        group = [(s, n) for n, s in enumerate(sources)]
        done: list[object] = []
        caller = threading.Thread(
            target=lambda: done.append(
                decode_pool._decode_group(group, LIMIT, 32, slots.block, Copies(settings, "network", keys))
            )
        )
        caller.start()
        caller.join(1.0)
        assert caller.is_alive() and not done  # its puts are held: no answer yet
        hold.set()
        caller.join(10)
        assert len(done) == 1 and all(error == "" for _, _, error in done[0])  # type: ignore[attr-defined]
        assert all(store.exists(key) for key, _ in keys)
        assert store.threads and all(name.startswith("pupyl-copy") for name in store.threads)

        failing = _RemoteStore(tmp_path / "failing", fail="c/images/3.jpg")
        monkeypatch.setattr(decode_pool, "_process_io", lambda copies: (failing, None))
        with pytest.raises(StoreUnavailable, match="went away"):
            decode_pool._decode_group(group, LIMIT, 32, slots.block, Copies(settings, "network", keys))
    finally:
        slots.close()


def big_photos(folder: Path, count: int) -> dict[Path, str]:
    """Distinct photos slow enough to decode that a kill lands while the batch is still decoding."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    files = {}
    for n in range(count):
        data = encode(Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)), "PNG")
        (folder / f"{n:03d}.png").write_bytes(data)
        files[folder / f"{n:03d}.png"] = hashlib.sha256(data).hexdigest()
    return files


def test_kill_9_of_a_decode_process_mid_batch_loses_and_doubles_nothing(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, tiny_model: Path
) -> None:
    files = big_photos(tmp_path / "photos", 12)
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, decode_processes=3)
    rt = Runtime(settings)
    decoder = rt.decode_pool()
    assert decoder is not None

    def kill_one_while_decoding() -> None:
        deadline = time.monotonic() + 120
        while not decoder.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the first images are being decoded (each takes far longer than this)
        os.kill(decoder.pids()[0], signal.SIGKILL)

    restarts = decoder.restarts
    killer = threading.Thread(target=kill_one_while_decoding)
    killer.start()
    try:
        items = index_folder(rt, tmp_path / "photos", tiny_model, "killed")
    finally:
        killer.join()
    assert decoder.restarts > restarts  # the kill landed mid-batch and the pool came back
    found = audit(rt.store, redis_client, "killed", items)
    assert len(found.indexed_ids) == len(files)
    assert_exactly_once(found, files, Layout("killed"))


def test_each_vector_is_of_its_own_image_when_the_network_reads_the_slots_in_place(
    redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    """The network reads a chunk's pixels straight from its slots when they are consecutive, and a
    stacked copy when a failed image leaves a gap: either way each id's vector is its own image's."""
    from pupyl_queue.codecs import decode_segment

    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(7):
        data = b"not an image" if n == 3 else encode(pattern(n), "PNG" if n % 2 else "JPEG")
        (folder / f"{n:02d}.{'png' if n % 2 else 'jpg'}").write_bytes(data)
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, decode_processes=2, infer_batch=2)
    rt = Runtime(settings)
    items = index_folder(rt, folder, tiny_model, "slots")
    assert [i["status"] for i in items] == ["indexed"] * 3 + ["failed"] + ["indexed"] * 3
    vectors: dict[int, np.ndarray] = {}
    for key in rt.store.list(Layout("slots").root + "/"):
        if key.endswith(".npz"):
            ids, rows = decode_segment(rt.store.get(key))
            vectors.update(zip(ids.tolist(), rows))
    extractor = rt.extractor("slots")
    for item in items:
        if item["status"] != "indexed":
            continue
        pixels = decode(Path(item["ref"]).read_bytes(), LIMIT, target=extractor.input_size).pixels(
            extractor.input_size
        )
        expected = extractor.embed(pixels[None])[0]
        np.testing.assert_allclose(vectors[item["id"]], expected, atol=1e-5, err_msg=item["ref"])


def test_runtimes_of_one_process_share_its_decode_pool(tmp_path: Path) -> None:
    """Idle decode processes cost memory: a second runtime in the same process starts none of its own."""
    settings = Settings(data_dir=tmp_path / "data", decode_processes=2)
    first, second = Runtime(settings), Runtime(settings)
    assert first.decode_pool() is second.decode_pool() is not None


ORPHAN_SCRIPT = """
import time
from pupyl_queue.decode_pool import Copies, DecodePool, PixelSlots, StoreWriteFailed
from tests.imagegen import encode, pattern
pool, slots = DecodePool(2), PixelSlots(1, 32)
pool.decode(encode(pattern(1), "PNG"), 10**7, slots, 0)
print(*pool.pids(), flush=True)
time.sleep(600)
"""


def test_decode_processes_exit_with_a_worker_killed_by_kill_9() -> None:
    """A worker killed with -9 cannot shut its pool down: its decode processes must not stay behind."""
    import psutil

    from tests.conftest import ROOT

    worker = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = worker.stdout.readline() if worker.stdout else ""
        children = [psutil.Process(int(pid)) for pid in line.split()]
        assert children, "the decode pool started no process"
    finally:
        worker.kill()
        worker.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"decode processes outlived their worker: {alive}"
