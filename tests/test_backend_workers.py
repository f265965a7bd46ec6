"""A collection indexed on TensorFlow goes on on a JAX or PyTorch embed worker: same vectors.

The images are indexed twice into one collection: once in this process (Keras on
TensorFlow) and once, as copies under other names, by a real embed worker started with
``KERAS_BACKEND=jax`` or ``torch``. The search worker (TensorFlow) embeds each photo as a
query; both copies must come back at distance ~0, so the other backend wrote the same
vectors into the same index. The int8 collection is converted by TensorFlow (here) and
its cached model then runs on the other backend's worker (LiteRT, preprocessing by Keras
on that backend).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue, Settings
from pupyl_queue.runtime import Runtime
from tests.conftest import PHOTOS
from tests.imagegen import encode, pattern
from tests.indexing import index_folder
from tests.workers import Workers

pytestmark = pytest.mark.slow
# The distance between an image's two copies: round-off only, far below any two photos' distance.
SAME_VECTOR = 1e-4


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    if PHOTOS.exists():
        for path in sorted((PHOTOS / "caer").glob("*.jpg"))[:6]:
            shutil.copy(path, folder / path.name)
    else:
        for seed in range(6):
            (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    return folder


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Workers]]:
    home = tmp_path_factory.mktemp("backends")
    settings = Settings(data_dir=home / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/6", batch_size=4)
    workers = Workers(settings, home)
    workers.start("ingest", "search", "maintenance")  # TensorFlow; the embed worker comes per backend
    PupylQueue(settings=settings).redis.flushdb()
    yield settings, workers
    workers.stop_all()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_collection_goes_on_on_another_backend(
    backend: str,
    stack: tuple[Settings, Workers],
    photos: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    settings, workers = stack
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in photos.iterdir():
        shutil.copy(path, copies / f"copy-{path.name}")
    env = {"KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    workers.start_named(f"embed-{backend}", "embed", settings, env=env)
    try:
        for precision in ("float32", "int8"):  # one worker, one collection of each
            collection = f"{backend}-{precision}"
            index_folder(Runtime(settings), photos, tiny_model, collection, precision=precision)  # TensorFlow
            client = PupylQueue(
                settings=settings, collection=collection, model=tiny_model, precision=precision
            )
            try:
                job = client.index(copies)
                state = job.wait(timeout=240)
                workers.check_alive()
                assert (state["indexed"], state["failed"]) == (len(list(photos.iterdir())), 0), job.failures()
                for path in sorted(photos.iterdir()):
                    hits = client.search(path, top=2, return_metadata=True, min_sequence=job.sequence)
                    names = sorted(hit["original_file_name"] for hit in hits)
                    assert names == sorted([path.name, f"copy-{path.name}"]), (path.name, hits)
                    distances = [hit["distance"] for hit in hits]
                    print(f"{backend} {precision} {path.name}: {distances}")
                    assert max(distances) < SAME_VECTOR, (path.name, hits)
            finally:
                client.close()
        log = (workers.log_dir / f"embed-{backend}.log").read_text(errors="replace")
        assert f"'backend': '{backend}'" in log  # this worker's Keras really ran on that backend
    finally:
        workers.stop_named(f"embed-{backend}")
