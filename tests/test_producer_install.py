"""A producer on the base install: the client's whole surface without FAISS, TensorFlow, workers/, api/.

DESIGN.md principle 12. The client runs in a child process where those modules cannot be
imported (tests/producer_surface.py), against a real stack: Redis and real Celery workers
in the test's own environment, which has them all. Why not a real second venv: a base
install needs the package index (tests never download), and a venv built by copying the
dependencies out of .venv would test that copy, not the dependency list; an import of a
module set to ``None`` in ``sys.modules`` fails exactly as an absent module does.

The import-linter contracts in pyproject.toml hold the same layering statically (every
import, lazy ones too); test_layers_hold runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pupyl_queue.settings import Settings
from tests.imagegen import encode, pattern, write_photo_set
from tests.workers import Workers

ROOT = Path(__file__).resolve().parents[1]


def test_layers_hold() -> None:
    """``lint-imports`` keeps every contract of pyproject.toml (also run by ``make lint``)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Settings, Workers]]:
    home = tmp_path_factory.mktemp("producer")
    settings = Settings(  # a database of its own, emptied: another module's commits must not leak in
        data_dir=home / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/15", model=str(tiny_model)
    )
    with redis.Redis.from_url(settings.broker_url) as r:
        r.flushdb()
    workers = Workers(settings, home)
    workers.start()
    yield settings, workers
    workers.stop_all()


@pytest.mark.slow
def test_client_surface_without_faiss_or_tensorflow(stack: tuple[Settings, Workers], tmp_path: Path) -> None:
    settings, workers = stack
    photos = tmp_path / "photos"
    photos.mkdir()
    good = write_photo_set(photos, count=5)
    (tmp_path / "upload.png").write_bytes(encode(pattern(50), "PNG"))
    env = {
        **os.environ,
        **settings.to_env(),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = ROOT / "tests" / "producer_surface.py"
    done = subprocess.run(
        [sys.executable, str(script), str(photos), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    workers.check_alive()
    assert done.returncode == 0, done.stderr[-6000:] + workers.logs()
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    total = len(good) + 2  # the photos and the two bad files
    assert seen["job"] == {"total": total, "indexed": len(good), "failed": 2, "duplicate": 0}
    assert seen["done"] is True and seen["report"] == total
    assert seen["failures"] == ["not_image.jpg", "truncated.jpg"]
    assert seen["top_name"] == good[0].name
    assert seen["by_bytes"] == seen["by_id"] and len(seen["by_id"]) == 1
    assert seen["by_vector"] == 2 and seen["async_count"] == len(good)
    assert seen["describe"]["name"] == "default" and seen["describe"]["dim"] == 256
    assert seen["describe"]["images"] == len(good)
    assert seen["collections"] == ["default"]
    assert seen["compact_count"] == len(good) and seen["snapshot_after_compact"] is True
    assert seen["exported"] == ["1.jpg", "2.jpg"]
    assert seen["removed"] is True
    assert seen["metadata"] == [True, None]  # read by id from its batch object; None once removed
    assert seen["uploaded"] == 1
    assert seen["backup"] is True and seen["restored"] == "copy" and seen["copy_images"] == len(good)
    assert seen["deleted"] == "copy" and seen["collections_after"] == ["default"]
    assert seen["loaded"] == []
