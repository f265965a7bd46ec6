"""Real parts for the tests: a redis-server and an S3 server on free ports, models built once.

Nothing here downloads: networks get random weights or the files in ../shared/data.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pupyl_queue.stack import free_port, start_redis, stop, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PHOTOS = SHARED_DATA / "photos"
MODELS = SHARED_DATA / "models"
MOBILENET_025 = MODELS / "mobilenet_2_5_224_tf_no_top.h5"

S3_ACCESS_KEY = "pupyl-test-access"
S3_SECRET_KEY = "pupyl-test-secret-do-not-log"


def s3_store(endpoint: str, store: str) -> dict[str, Any]:
    """Settings fields for a store in the tests' S3 server (its keys, plain HTTP): Settings(**...)."""
    return {
        "store": store,
        "s3_endpoint": endpoint,
        "s3_access_key": S3_ACCESS_KEY,
        "s3_secret_key": S3_SECRET_KEY,
        "s3_secure": False,
    }


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test data folder is not mounted)")
    return path


@pytest.fixture(scope="session", autouse=True)
def keras_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keras writes to $KERAS_HOME on import: keep it out of ~/.keras."""
    home = tmp_path_factory.mktemp("keras-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(home))
        mp.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        yield home


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (moto_server) speaking the S3 protocol on a free port."""
    port = free_port()
    # Its request log goes to a file: an unread pipe fills up and stalls the server.
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc, what="moto_server")
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, keras_home: Path) -> Path:
    """A small real network (MobileNet 0.25) as a user's .keras model: RGB 0..255 in, 256-d out.

    With ../shared/data/models present it carries real ImageNet weights, so
    retrieval is meaningful; otherwise random weights (same code path).
    """
    from pupyl_queue.models import wrap_mobilenet

    weights = MOBILENET_025 if MOBILENET_025.exists() else None
    return wrap_mobilenet(weights, tmp_path_factory.mktemp("models") / "mobilenet025.keras", alpha=0.25)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photos (or generated ones without shared data) plus two bad files."""
    folder = tmp_path_factory.mktemp("photos")
    if PHOTOS.exists():
        for name in ("caer", "coral/imprinting"):
            dest = folder / name.replace("/", "_")
            shutil.copytree(PHOTOS / name, dest)
        shutil.copy(PHOTOS / "pupyl" / "test_png.png", folder / "rgba.png")
        shutil.copy(PHOTOS / "pupyl" / "test_gif.gif", folder / "animated.gif")
        shutil.copy(SHARED_DATA / "bad" / "truncated.jpg", folder / "truncated.jpg")
        shutil.copy(SHARED_DATA / "bad" / "not_image.jpg", folder / "not_image.jpg")
    else:
        from tests.imagegen import write_photo_set

        write_photo_set(folder)
    return folder


@pytest.fixture(scope="session")
def http_server() -> Iterator[object]:
    from tests.httpserver import serve

    with serve() as server:
        yield server
