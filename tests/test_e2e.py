"""Index, search, remove and restart through real Celery workers, Redis and both stores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue, Settings
from pupyl_queue.layout import Layout
from pupyl_queue.store import open_store
from tests.conftest import MOBILENET_025, S3_ACCESS_KEY, S3_SECRET_KEY, need_shared
from tests.workers import Workers

pytestmark = pytest.mark.slow
BAD_FILES = {"truncated.jpg", "not_image.jpg"}


@pytest.fixture(scope="module", params=["file", "s3"])
def stack(
    request: pytest.FixtureRequest,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
) -> Iterator[tuple[PupylQueue, Workers]]:
    home = tmp_path_factory.mktemp(f"stack-{request.param}")
    db = 1 if request.param == "file" else 2
    settings = Settings(data_dir=home / "data", redis_url=redis_url.rsplit("/", 1)[0] + f"/{db}")
    if request.param == "s3":
        settings = settings.replace(
            store="s3://pupyl-test/e2e",
            s3_endpoint=request.getfixturevalue("s3_endpoint"),
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
            s3_secure=False,
        )
    workers = Workers(settings, home)
    workers.start()
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    yield client, workers
    client.close()
    workers.stop_all()


def test_index_search_remove_restart(stack: tuple[PupylQueue, Workers], photo_dir: Path) -> None:
    client, workers = stack
    files = sorted(p for p in photo_dir.rglob("*") if p.is_file())
    good = [p for p in files if p.name not in BAD_FILES]

    job = client.index(photo_dir)
    try:
        state = job.wait(timeout=300)
    finally:
        workers.check_alive()
    assert (state["total"], state["indexed"], state["failed"]) == (len(files), len(good), 2)
    reasons = {Path(item["ref"]).name: item["error"] for item in job.failures()}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["not_image.jpg"].startswith("not an image")

    query = good[0]
    hits = client.search(query, top=3, return_metadata=True)
    assert hits[0]["original_file_name"] == query.name
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert hits[0]["sha256"] and hits[0]["width"] > 0
    query_id = hits[0]["id"]
    ids = client.search(query, top=3)
    assert ids == [h["id"] for h in hits]
    pairs = client.search(query, top=3, return_distances=True)
    assert [p[0] for p in pairs] == ids and pairs[0][1] == pytest.approx(0.0, abs=1e-4)
    assert client.search(query_id, top=1) == [query_id]  # more like an indexed image

    snapshot = client.compact()
    assert snapshot["count"] == len(good)

    removed = client.remove(query_id)
    assert removed["removed"] is True
    after = client.search(query, top=len(good), return_distances=True, min_sequence=removed["sequence"])
    assert query_id not in [i for i, _ in after]
    assert len(after) == len(good) - 1
    store = open_store(client.settings)
    assert not store.exists(Layout().image(query_id))
    assert not store.exists(Layout().image_meta(query_id))

    workers.restart("search")
    again = client.search(query, top=len(good), return_distances=True, timeout=120)
    assert [i for i, _ in again] == [i for i, _ in after]
    assert [d for _, d in again] == pytest.approx([d for _, d in after], abs=1e-5)

    second = client.index(photo_dir, check_unique=True)
    state = second.wait(timeout=300)
    # Everything still indexed is a duplicate; the removed image comes back once, under a new id.
    assert (state["indexed"], state["duplicate"], state["failed"]) == (1, len(good) - 1, 2)
    new_id = next(i["id"] for i in second.report() if i["status"] == "indexed")
    assert new_id > max(i for i, _ in after)
    final = client.search_async(query, top=len(good) + 5).get(timeout=60)
    assert final["count"] == len(good)
    assert final["results"][0]["id"] == new_id
    workers.check_alive()
    assert S3_SECRET_KEY not in workers.logs()


def test_job_report_survives_in_store(stack: tuple[PupylQueue, Workers], tmp_path: Path) -> None:
    client, _ = stack
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"not an image at all")
    job = client.index(folder)
    state = job.wait(timeout=120)
    assert (state["failed"], state["indexed"]) == (1, 0)
    report = json.loads(open_store(client.settings).get(Layout().job_report(job.id, 0)))
    assert report["items"][0]["status"] == "failed"
    assert report["items"][0]["ref"].endswith("x.jpg")


@pytest.mark.realweights
def test_nearest_other_image_of_a_cat_is_a_cat(stack: tuple[PupylQueue, Workers], photo_dir: Path) -> None:
    """Real ImageNet weights (MobileNet 0.25 from ../shared/data/models) give semantic neighbours."""
    need_shared(MOBILENET_025)
    client, _ = stack
    cats = {"cat_test_0.bmp", "cat_train_0.bmp", "black_cat.jpg"}
    for name in ("cat_test_0.bmp", "cat_train_0.bmp"):
        query = next(photo_dir.rglob(name))
        hits = client.search(query, top=2, return_metadata=True)
        assert hits[0]["original_file_name"] == name
        assert hits[1]["original_file_name"] in cats - {name}, [h["original_file_name"] for h in hits]
