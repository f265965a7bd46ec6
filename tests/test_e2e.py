"""Index, search, remove and restart through real Celery workers, Redis and both stores."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pupyl_queue import PupylQueue, Settings
from pupyl_queue.jobs import batch_id
from pupyl_queue.layout import Layout
from pupyl_queue.store import open_store
from tests.conftest import MOBILENET_025, PHOTOS, S3_SECRET_KEY, need_shared, s3_store
from tests.httpserver import ApiClient, LoopbackServer
from tests.imagegen import encode, pattern
from tests.workers import Workers, thread_niceness

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
    settings = Settings(
        data_dir=home / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + f"/{db}",
        fetch_allow_networks="127.0.0.1/32",  # the loopback test HTTP server
    )
    if request.param == "s3":
        settings = settings.replace(
            **s3_store(request.getfixturevalue("s3_endpoint"), "s3://pupyl-test/e2e"),
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
    assert client.metadata(query_id) == {k: v for k, v in hits[0].items() if k != "distance"}
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
    assert client.metadata(query_id) is None  # its entry in the batch's metadata object reads as gone

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
    # The job and the store hold the batch's outcome: the result backend keeps no copy of it
    # (the index task's result, under its job's id, shows the key is the backend's).
    assert client.redis.exists(f"celery-task-meta-{job.id}")
    assert not client.redis.exists(f"celery-task-meta-{batch_id(job.id, 0)}")


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


def count(client: PupylQueue, empty_ok: bool = False) -> int:
    try:
        return int(client.search_async(np.ones(256, dtype=np.float32), top=1).get(timeout=60)["count"])
    except Exception as exc:  # the worker's CollectionMissing, rebuilt from JSON
        if empty_ok and "is empty" in str(exc):
            return 0
        raise


def test_remote_archive_and_list(stack: tuple[PupylQueue, Workers], http_server: LoopbackServer) -> None:
    client, _ = stack
    before = count(client)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for seed in range(100, 103):
            data = encode(pattern(seed), "JPEG")
            info = tarfile.TarInfo(f"remote/{seed}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_url = http_server.add(f"e2e-{uuid.uuid4().hex}.tar.gz", archive.getvalue())
    urls = [
        http_server.add(f"e2e-{uuid.uuid4().hex}.png", encode(pattern(s), "PNG"), "image/png")
        for s in (104, 105)
    ]
    list_url = http_server.add(
        f"e2e-{uuid.uuid4().hex}.csv", ("url\n" + "\n".join(urls) + "\nnonsense\n").encode()
    )
    first, second = client.index(tar_url), client.index(list_url)
    assert (first.wait(timeout=120)["indexed"], first.progress()["in_flight"]) == (3, 0)
    state = second.wait(timeout=120)
    assert (state["indexed"], state["failed"]) == (2, 1)
    assert "neither a path nor a URL" in second.failures()[0]["error"]
    assert count(client) == before + 5


def test_an_s3_prefix_is_read_by_the_embed_workers(stack: tuple[PupylQueue, Workers]) -> None:
    """An s3:// source reaches the embed workers as object names (PUPYL_S3_REFERENCES, the default):
    its decode processes read them (and, in a check_unique job, the worker's threads), a non-image
    fails alone, and the images are found by their own bytes. (That the ingest yields names, not
    bytes, is tests/test_sources.py's.)"""
    from pupyl_queue.store import S3Store

    client, workers = stack
    if not client.store.url.startswith("s3:"):
        pytest.skip("s3:// sources need the S3 server: the s3 stack runs this")
    s = client.settings
    bucket = f"src-{uuid.uuid4().hex[:8]}"
    source = S3Store(bucket, "", s.s3_endpoint, s.s3_access_key, s.s3_secret_key, secure=False)
    images = {f"photos/{seed}.png": encode(pattern(seed), "PNG") for seed in range(300, 305)}
    for key, data in {
        **images,
        "photos/bad.jpg": b"not an image",
        "elsewhere/x.png": images["photos/300.png"],
    }.items():
        source.put(key, data)
    before = count(client, empty_ok=True)  # alone (-k), the default collection is empty
    job = client.index(f"s3://{bucket}/photos/")
    state = job.wait(timeout=120)
    assert (state["total"], state["indexed"], state["failed"]) == (6, 5, 1)
    assert job.failures()[0]["ref"] == f"s3://{bucket}/photos/bad.jpg"
    assert job.failures()[0]["error"].startswith("not an image")
    assert count(client) == before + 5
    hits = client.search(images["photos/302.png"], top=1, return_metadata=True)
    assert hits[0]["original_file_name"] == "302.png" and hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert hits[0]["original_path"] == f"s3://{bucket}/photos"
    assert hits[0]["original_file_size"] == len(images["photos/302.png"])

    again = client.index(f"s3://{bucket}/photos/", check_unique=True)  # read by the worker's threads
    state = again.wait(timeout=120)
    assert (state["duplicate"], state["failed"]) == (5, 1)
    workers.check_alive()


def test_two_jobs_over_overlapping_folders(stack: tuple[PupylQueue, Workers], tmp_path: Path) -> None:
    """Two embed workers, two jobs sharing five images, check_unique: each image indexed once."""
    client, workers = stack
    before = count(client)
    images = {seed: encode(pattern(seed), "PNG") for seed in range(200, 215)}
    for name, seeds in (("a", range(200, 210)), ("b", range(205, 215))):
        (tmp_path / name).mkdir()
        for seed in seeds:
            (tmp_path / name / f"{name}-{seed}.png").write_bytes(images[seed])
    workers.start_extra("embed")
    jobs = [client.index(tmp_path / "a", check_unique=True), client.index(tmp_path / "b", check_unique=True)]
    states = [job.wait(timeout=300) for job in jobs]
    assert sum(s["indexed"] for s in states) == 15
    assert sum(s["duplicate"] for s in states) == 5
    assert count(client) == before + 15
    indexed = [i for job in jobs for i in job.report() if i["status"] == "indexed"]
    assert len({i["id"] for i in indexed}) == 15
    assert len({Path(i["ref"]).name.split("-")[1] for i in indexed}) == 15  # each seed once
    workers.check_alive()


def test_embed_worker_running_batches_in_threads(stack: tuple[PupylQueue, Workers], tmp_path: Path) -> None:
    """PUPYL_EMBED_CONCURRENCY=3: one embed process runs batches in threads (one network, one decode
    pool); every image ends indexed once, under its own id, and findable at distance 0."""
    client, workers = stack
    before = count(client, empty_ok=True)
    images = {seed: encode(pattern(seed), "PNG") for seed in range(300, 340)}
    for seed, data in images.items():
        (tmp_path / f"t-{seed}.png").write_bytes(data)
    workers.stop_named("embed")  # this worker alone takes the job's batches (8, 16, 16 images)
    proc = workers.start_named("embed-threads", "embed", workers.settings.replace(embed_concurrency=3))
    try:
        job = client.index(tmp_path)
        state = job.wait(timeout=300)
        assert (state["indexed"], state["failed"], state["batches_total"]) == (40, 0, 3)
        indexed = [i for i in job.report() if i["status"] == "indexed"]
        assert len({i["id"] for i in indexed}) == 40
        assert count(client) == before + 40
        stats = client.app.control.inspect(timeout=5).stats() or {}
        pools = [v["pool"] for k, v in stats.items() if k.startswith("embed-")]
        assert [(p["implementation"], p["max-concurrency"]) for p in pools] == [
            ("celery.concurrency.thread:TaskPool", 3)
        ]
        for item in indexed[::13]:
            hit = client.search(tmp_path / Path(item["ref"]).name, top=1, return_distances=True)[0]
            assert hit == (item["id"], pytest.approx(0.0, abs=1e-4))
        # On CPU the network's threads run nicer than the rest of the host (PUPYL_NETWORK_NICE, priority.py):
        # TensorFlow's own threads run at nice 10, the worker's main thread at 0.
        threads = thread_niceness(proc.pid)
        assert threads[proc.pid][1] == 0, threads
        tensorflow = [nice for name, nice in threads.values() if name.startswith("tf_")]
        assert tensorflow and set(tensorflow) == {10}, threads
        workers.check_alive()
    finally:
        workers.stop_named("embed-threads")
        workers.start("embed")


@pytest.mark.realweights
def test_near_duplicate_through_search_worker(stack: tuple[PupylQueue, Workers], tmp_path: Path) -> None:
    client, _ = stack
    photos = need_shared(PHOTOS)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    shutil.copy(photos / "coral" / "cat.bmp", tmp_path / "one" / "cat.bmp")
    shutil.copy(photos / "coral" / "cat_720p.jpg", tmp_path / "two" / "cat_720p.jpg")
    shutil.copy(photos / "coral" / "owl.jpg", tmp_path / "two" / "owl.jpg")
    client.index(tmp_path / "one", near_duplicate=0.02).wait(timeout=120)
    second = client.index(tmp_path / "two", near_duplicate=0.02)
    state = second.wait(timeout=120)
    report = {Path(i["ref"]).name: i for i in second.report()}
    assert report["cat_720p.jpg"]["status"] == "duplicate" and report["cat_720p.jpg"]["distance"] < 0.02
    assert state["duplicate"] == 1 and report["owl.jpg"]["status"] == "indexed"


def test_export_in_rank_order(stack: tuple[PupylQueue, Workers], photo_dir: Path, tmp_path: Path) -> None:
    client, _ = stack
    query = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name not in BAD_FILES)
    hits = client.search(query, top=3, return_metadata=True)
    store, layout = open_store(client.settings), Layout()
    plain = client.export(query, tmp_path / "plain", top=3)
    assert [p.name for p in plain] == ["1.jpg", "2.jpg", "3.jpg"]
    assert [p.read_bytes() for p in plain] == [store.get(layout.image(h["id"])) for h in hits]
    ids = client.export(query, tmp_path / "ids", top=3, keep_ids=True)
    assert [p.name for p in ids] == [f"{rank}_{h['id']}.jpg" for rank, h in enumerate(hits, 1)]
    names = client.export(query, tmp_path / "names", top=3, keep_names=True)
    assert names[0].name == f"1_{Path(hits[0]['original_file_name']).stem}.jpg"


def test_http_api(stack: tuple[PupylQueue, Workers], photo_dir: Path, http_server: LoopbackServer) -> None:
    """The aiohttp service in front of the same workers: auth, index, jobs, search, tasks, images."""

    from api.app import make_app
    from pupyl_queue.stack import free_port
    from tests.httpserver import serve_app

    client, _ = stack
    query = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name not in BAD_FILES)
    client.index(query.parent, check_unique=True).wait(timeout=120)  # whatever ran before, it is indexed
    token = "t0ken-" + uuid.uuid4().hex
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    call = ApiClient(base, token).call

    api_settings = client.settings.replace(api_tokens=token, model=client.model or "")
    with serve_app(make_app(api_settings), port):
        assert call("GET", "/healthz", auth=False) == (200, {"status": "ok"})
        status, body = call("POST", "/v1/search", {"id": 1}, auth=False)
        assert status == 401 and body["error"]["code"] == "unauthorized"  # type: ignore[index]
        assert call("GET", "/v1/nowhere")[0] == 404
        assert call("POST", "/v1/index", raw=b"{not json")[1]["error"]["code"] == "bad_json"  # type: ignore[index]
        assert call("POST", "/v1/index", {"uri": "x", "collection": "../up"})[0] == 400

        url = http_server.add(f"api-{uuid.uuid4().hex}.png", encode(pattern(321), "PNG"), "image/png")
        status, accepted = call("POST", "/v1/index", {"uri": url})
        assert status == 202
        state = ApiClient(base, token).wait_job(accepted["url"])
        assert state["indexed"] == 1, state
        # a local path from the network is refused: it is not under PUPYL_ALLOWED_ROOTS
        status, refused = call("POST", "/v1/index", {"uri": str(photo_dir)})
        assert status == 403 and "allowed roots" in refused["error"]["message"]  # type: ignore[index]

        boundary = "pupylboundary"
        form = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="top"\r\n\r\n3\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\ntrue\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + query.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, found = call(
            "POST", "/v1/search", raw=form, content_type=f"multipart/form-data; boundary={boundary}"
        )
        assert status == 200, found
        first = found["results"][0]  # type: ignore[index]
        assert first["metadata"]["original_file_name"] == query.name and first["distance"] < 1e-4
        status, queued = call("POST", "/v1/search", {"id": first["id"], "top": 2, "wait": False})
        assert status == 202
        while (task := call("GET", queued["url"])[1])["state"] not in ("SUCCESS", "FAILURE"):  # type: ignore[index]
            time.sleep(0.1)
        assert task["result"]["results"][0]["id"] == first["id"]  # type: ignore[index]

        meta = call("GET", f"/v1/images/{first['id']}")[1]
        assert meta["sha256"] == first["metadata"]["sha256"]  # type: ignore[index]
        status, jpeg = call("GET", f"/v1/images/{first['id']}/file")
        assert status == 200 and isinstance(jpeg, bytes) and jpeg[:2] == b"\xff\xd8"
        status, gone = call("DELETE", f"/v1/images/{first['id']}")
        assert status == 200 and gone["removed"] is True  # type: ignore[index]
        assert call("GET", f"/v1/images/{first['id']}")[0] == 404
        assert call("DELETE", f"/v1/images/{first['id']}") == (200, gone)  # DELETE is idempotent
        assert call("DELETE", "/v1/images/999999999")[0] == 404
        listed = call("GET", "/v1/collections")[1]["collections"]  # type: ignore[index]
        assert [c["name"] for c in listed] == ["default"] and listed[0]["images"] > 0
        assert call("GET", "/v1/collections/default")[1]["dim"] == 256  # type: ignore[index]
        assert call("GET", "/v1/collections/nothing-here")[0] == 404
        assert call("DELETE", "/v1/collections/nothing-here")[0] == 404
        assert call("GET", "/v1/collections/..%2Fetc")[0] in (400, 404)
        # put the image back for the tests that follow on this stack
        client.index(query.parent, check_unique=True).wait(timeout=120)


def test_a_network_that_overflows_fails_its_batch_and_indexes_nothing(
    stack: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    """A model whose output overflows (inf) gives no vectors: its batch fails with the reason and
    nothing reaches the index (as float16 on a GPU would, past its range), and other collections
    go on. Both stores share the failure path (jobs.fail_batch; test_job_end covers S3's)."""
    import keras

    from pupyl_queue.client import JobFailed

    client, workers = stack
    if not client.store.url.startswith("file:"):
        pytest.skip("a batch's failure path does not depend on the store: the file stack runs it (13 s)")
    before = count(client, empty_ok=True)  # alone (-k), the default collection is empty
    inputs = keras.Input((32, 32, 3))
    overflow = keras.Model(
        inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1e38)(inputs))
    )
    overflow.save(tmp_path / "overflow.keras")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    other = PupylQueue(
        settings=client.settings,
        collection=f"overflow-{uuid.uuid4().hex[:8]}",
        model=tmp_path / "overflow.keras",
    )
    try:
        job = other.index(folder)
        with pytest.raises(JobFailed, match="non-finite values"):
            job.wait(timeout=120)
        state = job.progress()
        assert (state["state"], state["indexed"], state["failed"]) == ("failed", 0, 3)
        assert all("non-finite values (inf or NaN) for 3 of 3 images" in f["error"] for f in job.failures())
    finally:
        other.close()
    assert count(client, empty_ok=True) == before
    workers.check_alive()
