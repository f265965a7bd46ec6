"""Expansion and embedding in-process (real Redis, real store, real model; no Celery).

Here the redelivery cases run deterministically: a batch run twice, two batches
with the same bytes at the same moment.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from pupyl_queue import constants as C
from pupyl_queue.coordination import read_job
from pupyl_queue.embedding import embed_batch
from pupyl_queue.ingest import expand_job
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import decode_batch
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.sources import OUTSIDE_ROOTS
from pupyl_queue.store import StoreUnavailable
from tests.conftest import MOBILENET_025, PHOTOS, need_shared, s3_store
from tests.imagegen import encode, pattern
from tests.indexing import expand_folder, index_folder


@pytest.fixture
def rt(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path, redis_url=redis_url, batch_size=4))


def job(rt: Runtime, uri: Path, model: Path, job_id: str, check_unique: bool = False) -> list[dict[str, Any]]:
    return expand_folder(rt, uri, model, job_id=job_id, check_unique=check_unique)


def folder_of(tmp_path: Path, count: int, name: str = "imgs") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for seed in range(count):
        (folder / f"{seed:02d}.png").write_bytes(encode(pattern(seed), "PNG"))
    return folder


def test_redelivered_batch_indexes_nothing_twice(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    rt = Runtime(rt.settings.replace(inline_item_bytes=0))  # every image through the store's staging area
    batches = job(rt, folder_of(tmp_path, 9), tiny_model, "j1")
    assert all("key" in item for b in batches for item in b["items"])
    assert [len(b["items"]) for b in batches] == [1, 1, 2, 4, 1]  # sizes ramp up to batch_size
    first = embed_batch(rt, batches[3])
    again = embed_batch(rt, batches[3])  # e.g. the worker died after committing, before the ack
    assert again["sequence"] == first["sequence"] == 1
    assert [i["id"] for i in first["items"]] == [1, 2, 3, 4]
    for batch in batches:
        embed_batch(rt, batch)
    state = read_job(rt.redis, "j1")
    assert state is not None
    assert (state["state"], state["indexed"], state["batches_done"]) == ("done", 9, 5)
    searcher = rt.searcher("default")
    assert len(searcher) == 9 and searcher.sequence == 5
    assert list(rt.store.list(Layout().staging("j1") + "/")) == []  # staged bytes cleaned up


def test_large_batches_carry_references_past_the_inline_budget(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    folder = folder_of(tmp_path, 15)
    size = max(p.stat().st_size for p in folder.iterdir())
    rt = Runtime(rt.settings.replace(batch_size=8, inline_batch_bytes=3 * size))
    batches = job(rt, folder, tiny_model, "jb")
    assert [len(b["items"]) for b in batches] == [1, 2, 4, 8]
    for batch in batches:  # at most the budget's bytes inline per message, the rest by store key
        inline = [item for item in batch["items"] if "data_b64" in item]
        assert len(inline) == min(3, len(batch["items"])) and len(batch["items"]) - len(inline) == sum(
            "key" in item for item in batch["items"]
        )
    none = job(Runtime(rt.settings.replace(inline_batch_bytes=0)), folder, tiny_model, "jn")
    assert all("key" in item for batch in none for item in batch["items"])
    assert sum(embed_batch(rt, batch)["indexed"] for batch in batches) == 15


def test_crash_before_commit_then_rerun_reuses_ids(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    batches = job(rt, folder_of(tmp_path, 3), tiny_model, "j2")
    coord = rt.coordinator("default")
    ids_before_crash = coord.allocate_ids("j2-000000", 1)  # what a dying worker had allocated
    assert "data_b64" in batches[0]["items"][0]  # small images travel inline in the message
    result = embed_batch(rt, batches[0])
    assert [i["id"] for i in result["items"]] == ids_before_crash
    assert coord.last_sequence() == 1


def test_same_bytes_in_two_concurrent_jobs(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    a = job(rt, folder_of(tmp_path, 2, "a"), tiny_model, "ja", check_unique=True)
    b = job(rt, folder_of(tmp_path, 2, "b"), tiny_model, "jb", check_unique=True)
    results: list[dict[str, Any]] = []
    gate = threading.Barrier(2)

    def run(batches: list[dict[str, Any]]) -> None:
        gate.wait()
        for batch in batches:
            results.append(embed_batch(rt, batch))

    threads = [threading.Thread(target=run, args=(batches,)) for batches in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = [i for r in results for i in r["items"]]
    assert sorted(i["status"] for i in items) == ["duplicate", "duplicate", "indexed", "indexed"]
    indexed = {i["id"] for i in items if i["status"] == "indexed"}
    assert {i["duplicate_of"] for i in items if i["status"] == "duplicate"} == indexed
    assert len(rt.searcher("default")) == 2


def test_bad_items_fail_alone(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    folder = folder_of(tmp_path, 2)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "bomb.png").write_bytes(encode(Image.new("L", (9000, 9000)), "PNG"))
    rt = Runtime(rt.settings.replace(max_pixels=50_000_000))
    items = [i for batch in job(rt, folder, tiny_model, "j3") for i in embed_batch(rt, batch)["items"]]
    outcome = {Path(i["ref"]).name: i.get("error", i["status"]) for i in items}
    assert outcome["00.png"] == outcome["01.png"] == "indexed"
    assert outcome["zero.jpg"] == "empty file"
    assert "decompression bomb" in outcome["bomb.png"]
    # failed items leave nothing behind: only the two good images are stored, with their metadata
    assert len(list(rt.store.list(Layout().root + "/images/"))) == 2
    objects = rt.store.list(f"{Layout().root}/{C.STORE_META}/")
    held = [i for key in objects for i in decode_batch(rt.store.get(key))]
    assert sorted(held) == sorted(i["id"] for i in items if "id" in i) and len(held) == 2


def searcher_nearest(rt: Runtime):  # type: ignore[no-untyped-def]
    """What the search workers answer to pupyl.nearest, computed in this process."""

    def nearest(collection: str, vectors: Any) -> list[tuple[int, float] | None]:
        rows = rt.searcher(collection).search_many(vectors, 1)
        return [row[0] if row else None for row in rows]

    return nearest


def run_job(rt: Runtime, folder: Path, model: Path, job_id: str, **options: Any) -> list[dict[str, Any]]:
    return index_folder(rt, folder, model, nearest=searcher_nearest(rt), job_id=job_id, **options)


def test_check_unique_accepts_distinct_and_refuses_copies(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for seed in range(7):
        (folder / f"distinct_{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    for seed in (1, 4, 6):
        (folder / f"zz_copy_of_{seed}.png").write_bytes((folder / f"distinct_{seed}.png").read_bytes())
    items = run_job(rt, folder, tiny_model, "ju", check_unique=True)
    by_name = {Path(i["ref"]).name: i for i in items}
    assert all(by_name[f"distinct_{s}.png"]["status"] == "indexed" for s in range(7))
    for seed in (1, 4, 6):
        copy = by_name[f"zz_copy_of_{seed}.png"]
        assert copy["status"] == "duplicate" and copy["duplicate_of"] == by_name[f"distinct_{seed}.png"]["id"]
    # indexing the folder again refuses everything, and indexes nothing twice
    again = run_job(rt, folder, tiny_model, "ju2", check_unique=True)
    assert {i["status"] for i in again} == {"duplicate"}
    assert len(rt.searcher("default")) == 7


@pytest.mark.realweights
def test_near_duplicates_with_a_threshold(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    need_shared(MOBILENET_025)
    photos = need_shared(PHOTOS)
    first = tmp_path / "first"
    shutil.copytree(photos / "coral", first, ignore=shutil.ignore_patterns("imprinting"))
    shutil.copy(photos / "pupyl" / "test_database_0_0.jpg", first)
    items = run_job(rt, first, tiny_model, "jn", near_duplicate=0.02)
    by_name = {Path(i["ref"]).name: i for i in items}
    # cat_720p.jpg is cat.bmp at another size: a near duplicate; every other photo is distinct.
    assert by_name["cat_720p.jpg"]["status"] == "duplicate"
    assert by_name["cat_720p.jpg"]["duplicate_of"] == by_name["cat.bmp"]["id"]
    assert by_name["cat_720p.jpg"]["distance"] < 0.02
    assert [n for n, i in by_name.items() if i["status"] != "indexed"] == ["cat_720p.jpg"]
    # A later job: test_image.jpg is a near copy of test_database_0_0.jpg, found through the index.
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(photos / "pupyl" / "test_image.jpg", second)
    shutil.copy(photos / "caer" / "tent.jpg", second)
    later = {Path(i["ref"]).name: i for i in run_job(rt, second, tiny_model, "jn2", near_duplicate=0.02)}
    assert later["test_image.jpg"]["duplicate_of"] == by_name["test_database_0_0.jpg"]["id"]
    assert later["tent.jpg"]["status"] == "indexed"


def test_compaction_is_due_once_per_threshold(rt: Runtime) -> None:
    from pupyl_queue.embedding import compaction_due

    rt = Runtime(rt.settings.replace(compact_commits=3))
    coord = rt.coordinator("default")
    assert not compaction_due(rt, "default", None)
    assert not compaction_due(rt, "default", 2)
    assert compaction_due(rt, "default", 3)
    assert not compaction_due(rt, "default", 4)  # already queued
    coord.set_snapshot_watermark(4)
    rt.redis.delete(coord.layout.key("compact-due"))  # the compaction ran and cleared the flag
    assert not compaction_due(rt, "default", 5) and compaction_due(rt, "default", 7)


def test_local_references_stage_nothing_and_read_at_embed(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """PUPYL_LOCAL_REFERENCES: items carry the file's path; the embed worker reads it through the same
    gate. Nothing goes through the store's staging area; a file gone or swapped for a link out of the
    roots since the expansion fails alone, with its reason."""
    folder = folder_of(tmp_path, 6)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode(pattern(99), "PNG"))
    settings = rt.settings.replace(local_references=True, allowed_roots=str(folder), inline_item_bytes=0)
    rt = Runtime(settings)
    batches = expand_folder(rt, folder, tiny_model, job_id="jr", origin="network")
    items = [item for b in batches for item in b["items"]]
    assert all(set(item) >= {"ref", "path"} and "key" not in item for item in items)
    assert all(b["origin"] == "network" for b in batches)
    assert not list(rt.store.list(Layout().staging("jr") + "/"))
    (folder / "02.png").unlink()
    (folder / "03.png").unlink()
    (folder / "03.png").symlink_to(outside / "secret.png")
    outcome = {}
    for batch in batches:
        for item in embed_batch(rt, batch)["items"]:
            outcome[Path(item["ref"]).name] = item.get("error", item["status"])
    assert outcome["02.png"] == "no such file or directory"
    assert outcome["03.png"] == OUTSIDE_ROOTS
    assert [outcome[f"{n:02d}.png"] for n in (0, 1, 4, 5)] == ["indexed"] * 4
    state = read_job(rt.redis, "jr")
    assert state is not None and (state["state"], state["indexed"], state["failed"]) == ("done", 4, 2)


def test_int8_first_job_keeps_bytes_for_calibration_even_with_references(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    rt = Runtime(rt.settings.replace(local_references=True, precision="int8"))
    batches = expand_folder(rt, folder_of(tmp_path, 5), tiny_model, job_id="jc", precision="int8")
    assert not any("path" in item for b in batches for item in b["items"])
    assert len(list(rt.store.list(Layout().calibration + "/"))) == 5


def test_a_near_duplicate_keeps_its_key_in_the_report(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    need_shared(MOBILENET_025)
    photos = need_shared(PHOTOS)
    listing = tmp_path / "items.jsonl"
    lines = [
        {"uri": str(photos / "coral" / "cat.bmp"), "key": "sku-1"},
        {"uri": str(photos / "coral" / "cat_720p.jpg"), "key": "sku-2"},
    ]
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = run_job(rt, listing, tiny_model, "jk", near_duplicate=0.02)
    by_key = {i["key"]: i for i in items}
    assert by_key["sku-1"]["status"] == "indexed"
    assert by_key["sku-2"]["status"] == "duplicate"
    assert by_key["sku-2"]["duplicate_of"] == by_key["sku-1"]["id"]


def test_staged_copies_to_s3_are_in_the_store_before_their_batch_is_sent(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path, s3_endpoint: str
) -> None:
    """To a remote store the ingest stages copies several at a time while it goes on reading; a
    batch is dispatched only once every copy it names has landed. Real Redis and a real S3 server."""
    settings = Settings(
        **s3_store(s3_endpoint, f"s3://stage-{uuid.uuid4().hex[:8]}/pq"),
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        batch_size=8,
        inline_item_bytes=0,  # every image through the staging area
    )
    rt = Runtime(settings)
    folder = folder_of(tmp_path, 20)
    missing: list[str] = []
    sent: list[dict[str, Any]] = []

    def dispatch(request: dict[str, Any]) -> None:
        missing.extend(item["key"] for item in request["items"] if not rt.store.exists(item["key"]))
        sent.append(request)

    rt.coordinator("default").create_job("js3", {"collection": "default"})
    request = {
        "job_id": "js3",
        "collection": "default",
        "uri": str(folder),
        "model": str(tiny_model),
        "origin": "local",
    }
    expand_job(rt, request, dispatch)  # type: ignore[arg-type]
    assert sum(len(b["items"]) for b in sent) == 20 and all("key" in i for b in sent for i in b["items"])
    assert missing == []
    for batch in sent:
        embed_batch(rt, batch)
    state = read_job(rt.redis, "js3")
    assert state is not None and (state["state"], state["indexed"]) == ("done", 20)


def test_a_staged_copy_that_cannot_be_written_stops_the_expansion_before_its_batch(
    rt: Runtime, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put that fails in a staging thread fails the ingest (StoreUnavailable: the task retries it),
    and the batch naming that copy is never sent."""
    rt = Runtime(rt.settings.replace(inline_item_bytes=0))
    monkeypatch.setattr(type(rt.store), "remote", True)  # a local directory standing in for S3
    put = rt.store.put

    def failing(key: str, data: bytes) -> None:
        if key.endswith("/5"):
            raise StoreUnavailable("the store went away")
        put(key, data)

    monkeypatch.setattr(rt.store, "put", failing)
    sent: list[dict[str, Any]] = []
    rt.coordinator("default").create_job("jfail", {"collection": "default"})
    request = {
        "job_id": "jfail",
        "collection": "default",
        "uri": str(folder_of(tmp_path, 9)),
        "model": str(tiny_model),
        "origin": "local",
    }
    with pytest.raises(StoreUnavailable, match="went away"):
        expand_job(rt, request, sent.append)  # type: ignore[arg-type]
    assert all(not item["key"].endswith("/5") for batch in sent for item in batch["items"])
    assert [len(b["items"]) for b in sent] == [1, 1, 2]  # items 0-3; the batch of 4-7 was not sent


def test_uploads_reach_the_embed_worker_by_key_and_stay_until_the_job_ends(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """An upload job's images go to the embed worker as their keys in the store: the ingest reads no
    bytes and stages nothing; they are deleted when the job ends, not after their batch; an upload
    over the size limit fails at the listing."""
    rt = Runtime(rt.settings.replace(max_image_bytes=30_000))
    layout, job_id = Layout(), "jup"
    images = {f"{n}-{n}.png": encode(pattern(60 + n), "PNG") for n in range(5)}
    images["5-big.png"] = encode(Image.effect_noise((300, 300), 90).convert("RGB"), "PNG")
    assert len(images["5-big.png"]) > 30_000
    for name, data in images.items():
        rt.store.put(f"{layout.uploads(job_id)}/{name}", data)
    rt.coordinator("default").create_job(job_id, {"collection": "default"})
    batches: list[dict[str, Any]] = []
    request = {"job_id": job_id, "collection": "default", "uri": f"upload:{job_id}", "model": str(tiny_model)}
    expand_job(rt, request, batches.append)  # type: ignore[arg-type]
    items = [item for batch in batches for item in batch["items"]]
    assert [i.get("upload") for i in items[:5]] == [f"{layout.uploads(job_id)}/{n}-{n}.png" for n in range(5)]
    assert all("data_b64" not in i and "key" not in i for i in items)
    assert "too large" in items[5]["error"] and items[5]["meta"]["original_file_size"] == len(
        images["5-big.png"]
    )
    assert list(rt.store.list(layout.staging(job_id) + "/")) == []
    assert [i["status"] for i in embed_batch(rt, batches[0])["items"]] == ["indexed"]
    # Unlike a staged copy, an upload outlives its batch: an expansion run again (its first run
    # cut off) lists the same uploads and numbers the same batches.
    assert rt.store.exists(items[0]["upload"])
    for batch in batches[1:]:
        embed_batch(rt, batch)
    state = read_job(rt.redis, job_id)
    assert state is not None and (state["state"], state["indexed"], state["failed"]) == ("done", 5, 1)
    assert list(rt.store.list(layout.uploads(job_id) + "/")) == []  # the job ended: its uploads went
