"""Metadata as one object per embed batch (issue #15): reads by id, the old per-image layout,
removal, backup/restore, and what one batch costs in store operations and Redis round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue.backup import backup, restore
from pupyl_queue.embedding import embed_batch
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import decode_batch, read, read_one
from pupyl_queue.queries import remove, search
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.counting import CountingStore, count_redis
from tests.imagegen import pattern_folder
from tests.indexing import expand_folder, index_folder


@pytest.fixture
def rt(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=8))


def batch_objects(rt: Runtime, layout: Layout) -> dict[str, dict[int, dict[str, Any]]]:
    return {key: decode_batch(rt.store.get(key)) for key in rt.store.list(f"{layout.root}/{C.STORE_META}/")}


def old_layout_meta(rt: Runtime, layout: Layout, image_id: int, sha256: str) -> dict[str, Any]:
    """What an embed worker before batch objects wrote: images/<id>.json, no range in Redis."""
    meta = {"id": image_id, "ref": f"old/{image_id}.jpg", "sha256": sha256, "width": 8, "height": 8}
    rt.store.put(layout.image_meta(image_id), json.dumps(meta).encode())
    rt.redis.hset(layout.key(C.KEY_HASHES), sha256, image_id)
    return meta


def test_one_metadata_object_per_batch_read_by_id(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    layout = Layout()
    folder = pattern_folder(tmp_path / "a", range(12))
    (folder / "broken.jpg").write_bytes(b"not an image")
    batches = expand_folder(rt, folder, tiny_model)
    items = [item for batch in batches for item in embed_batch(rt, batch)["items"]]
    indexed = [item["id"] for item in items if item["status"] == "indexed"]
    assert len(indexed) == 12 and len(batches) > 2

    objects = batch_objects(rt, layout)
    assert len(objects) == len(batches)  # one per batch (each kept an image), none per image
    assert sorted(i for held in objects.values() for i in held) == sorted(indexed)
    assert not [k for k in rt.store.list(f"{layout.root}/{C.STORE_IMAGES}/") if k.endswith(".json")]

    metas = read(rt.store, rt.redis, layout, indexed)
    assert [m["id"] for m in metas] == indexed  # type: ignore[index]
    by_ref = {item["ref"]: item["id"] for item in items if item["status"] == "indexed"}
    assert all(by_ref[m["ref"]] == m["id"] and m["sha256"] and m["width"] == 160 for m in metas)  # type: ignore[index]
    failed_id = rt.redis.get(layout.key(C.KEY_ID_COUNTER))  # allocated, never kept: the last item
    assert read(rt.store, rt.redis, layout, [int(failed_id), 10**9, 0]) == [None, None, None]

    answer = search(rt, {"collection": "default", "query": {"id": indexed[3]}, "top": 5, "metadata": True})
    assert [row["metadata"]["id"] for row in answer["results"]] == [row["id"] for row in answer["results"]]
    assert answer["results"][0]["metadata"] == metas[3]


def test_old_layout_objects_still_read_and_remove(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    """A collection written one object per image, then indexed into with batch objects."""
    layout = Layout()
    rt.redis.set(layout.key(C.KEY_ID_COUNTER), 10)  # ids 1-10 went to an old embed worker
    below = old_layout_meta(rt, layout, 7, "aa" * 32)  # below every range
    new = index_folder(rt, pattern_folder(tmp_path / "a", range(3)), tiny_model)
    assert min(item["id"] for item in new) == 11
    rt.redis.set(layout.key(C.KEY_ID_COUNTER), 50)  # an old worker still running through the upgrade
    after = old_layout_meta(rt, layout, 50, "bb" * 32)  # the newest range's object does not hold it

    got = read(rt.store, rt.redis, layout, [7, new[1]["id"], 50, 49, 3])
    assert got[0] == below and got[2] == after and got[3] is None and got[4] is None
    assert got[1]["ref"] == new[1]["ref"]  # type: ignore[index]

    assert remove(rt, {"collection": "default", "id": 50})["removed"]
    assert read_one(rt.store, rt.redis, layout, 50) is None
    assert not rt.store.exists(layout.image_meta(50))  # the old object goes, as before
    assert rt.redis.hget(layout.key(C.KEY_HASHES), "bb" * 32) is None
    assert read_one(rt.store, rt.redis, layout, 7) == below


def test_removal_hides_one_image_of_a_batch(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    layout = Layout()
    items = index_folder(rt, pattern_folder(tmp_path / "a", range(4)), tiny_model)
    ids = [item["id"] for item in items]
    objects = batch_objects(rt, layout)
    (key, held), *_ = [(k, h) for k, h in objects.items() if len(h) > 1]
    victim, neighbour = sorted(held)[:2]
    sha = held[victim]["sha256"]

    result = remove(rt, {"collection": "default", "id": victim})
    assert result["removed"] is True
    assert read_one(rt.store, rt.redis, layout, victim) is None
    assert read_one(rt.store, rt.redis, layout, neighbour) == held[neighbour]  # same object, still there
    assert not rt.store.exists(layout.image(victim))
    assert rt.redis.hget(layout.key(C.KEY_HASHES), sha) is None  # its content may be indexed again
    again = remove(rt, {"collection": "default", "id": victim})  # a redelivered removal
    assert again["sequence"] == result["sequence"]
    assert remove(rt, {"collection": "default", "id": 10**6})["removed"] is False

    hits = search(rt, {"collection": "default", "query": {"id": neighbour}, "top": 10, "metadata": True})
    assert victim not in [row["id"] for row in hits["results"]]
    assert all(row["metadata"] is not None for row in hits["results"])
    assert sorted(decode_batch(rt.store.get(key))) == sorted(held)  # the object itself is immutable
    assert set(ids) - {victim} == {m["id"] for m in read(rt.store, rt.redis, layout, ids) if m}


def test_backup_restore_keeps_batch_metadata_and_removals(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    items = index_folder(rt, pattern_folder(tmp_path / "a", range(5)), tiny_model)
    ids = [item["id"] for item in items]
    remove(rt, {"collection": "default", "id": ids[1]})
    before = read(rt.store, rt.redis, Layout(), ids)
    archive = tmp_path / "backup.tar"
    backup(rt.store, rt.redis, "default", str(archive), rt.settings)

    result = restore(str(archive), rt.store, rt.redis, rt.settings, as_name="copy")
    copy = Layout("copy")
    assert result["images"] == 4
    assert read(rt.store, rt.redis, copy, ids) == before and before[1] is None
    assert rt.redis.hlen(copy.key(C.KEY_HASHES)) == 4


def test_one_batch_costs_per_image_one_write_and_constant_redis(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    """Per batch, whatever its size: one metadata object, and the id allocation, the dedup claims
    and the commit one Redis round trip each, however many inference chunks (of 4 here) it runs;
    with check_unique the claims go chunk by chunk (a duplicate skips the network).

    The stored copies are written by the decode processes (decode_pool.Copies), through their own
    client of the same store: counted here as the files they add, not as this process's puts."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=16, infer_batch=4)
    rt = Runtime(settings)
    store = CountingStore(urlparse(settings.store_url).path)
    images = Path(store.root, Layout().image(0)).parent
    client, trips = count_redis(redis_url)
    rt.__dict__["store"], rt.__dict__["redis"] = store, client
    trips.name_scripts(rt.coordinator("default"))
    batches = expand_folder(rt, pattern_folder(tmp_path / "a", range(33)), tiny_model)
    assert [len(b["items"]) for b in batches] == [2, 4, 8, 16, 3]  # the last one ends the job: not counted
    for batch in batches[:2]:
        embed_batch(rt, batch)  # loads the Lua scripts and the model

    per_batch = []
    for batch in batches[2:4]:
        store.ops.clear()
        trips.clear()
        copies_before = len(list(images.glob("*.jpg")))
        result = embed_batch(rt, batch)
        n = len(batch["items"])
        assert result["indexed"] == n
        assert len(list(images.glob("*.jpg"))) - copies_before == n  # the stored copy: one write per image
        assert store.ops[("put", "images/*.jpg")] == 0  # ...by the decode processes, not by this one
        assert store.ops[("put", C.STORE_META)] == 1
        assert store.ops[("put", C.STORE_SEGMENTS)] == 1
        assert store.total("put") == 3  # + the job report
        assert store.total("get") == 0  # small images ride in the message
        calls = trips.by_first_command()
        assert (calls["lua:allocate"], calls["lua:claim"], calls["lua:publish"]) == (1, 1, 1), trips.log
        assert calls["HSET"] == 0, trips.log  # the segment's checksum goes in with the commit's Lua call
        per_batch.append(len(trips.log))
    assert per_batch[0] == per_batch[1] <= 10, (per_batch, trips.log)  # 8 images or 16: the same round trips
    embed_batch(rt, batches[4])

    unique = expand_folder(rt, tmp_path / "a", tiny_model, check_unique=True)
    trips.clear()
    result = embed_batch(rt, unique[3])
    assert result["duplicate"] == 16 and trips.by_first_command()["lua:claim"] == 4  # 16 images, chunks of 4
