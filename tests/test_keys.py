"""Callers' keys and upserts through ingest, embed, commit, searchers, compaction, rebuild and restore.

The ingest and embed stages run in the test process (tests/indexing.py) against a real Redis, a real
local store and a real (tiny) Keras model; the workers' version is tests/test_keys_workers.py.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue.backup import backup, restore
from pupyl_queue.codecs import SegmentRows, decode_segment, decode_segment_rows, encode_segment
from pupyl_queue.coordination import Coordinator
from pupyl_queue.embedding import embed_batch
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import read_one
from pupyl_queue.models import normalize
from pupyl_queue.queries import compact, remove, search, set_attributes
from pupyl_queue.rebuild import rebuild
from pupyl_queue.runtime import Runtime
from pupyl_queue.searcher import Searcher
from pupyl_queue.settings import Settings
from pupyl_queue.store import LocalStore
from tests.imagegen import encode, pattern, pattern_folder
from tests.indexing import expand_folder, index_folder

LAYOUT = Layout()


@pytest.fixture
def rt(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))


def write_list(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{seed}.jpg"
    path.write_bytes(encode(pattern(seed), "JPEG"))
    return path


def by_image(rt: Runtime, path: Path, top: int = 50) -> list[dict[str, Any]]:
    query = {"image_b64": base64.b64encode(path.read_bytes()).decode()}
    return search(rt, {"collection": "default", "query": query, "top": top, "metadata": True})["results"]


def live_ids(rt: Runtime) -> set[int]:
    searcher = rt.searcher("default")
    searcher.refresh(force=True)
    return set(np.flatnonzero(searcher.index.ids._bits).tolist()) if searcher.index is not None else set()


# --- the format and the commit, without the network
def test_segment_rows_round_trip_and_old_segments_still_decode() -> None:
    ids, vectors = np.array([5, 6]), np.ones((2, 4), np.float32)
    rows = SegmentRows(
        ["sku-é", None], ["ab" * 32, "cd" * 32], [{"price": 3.5, "tags": ["a"]}, None], [{"width": 4}, None]
    )
    got_ids, got_vectors, got = decode_segment_rows(encode_segment(ids, vectors, rows))
    assert got_ids.tolist() == [5, 6] and got == rows
    assert decode_segment(encode_segment(ids, vectors, rows))[0].tolist() == [5, 6]
    old = decode_segment_rows(encode_segment(ids, vectors))[2]  # written before keys existed
    assert old.keys == [None, None] and not old.says_anything()
    with pytest.raises(ValueError, match="3 row records for 2 ids"):
        encode_segment(ids, vectors, SegmentRows(["a", "b", "c"], [None] * 3, [None] * 3, [None] * 3))
    with pytest.raises(ValueError, match="rows of unequal lengths"):
        encode_segment(ids, vectors, SegmentRows(["a", "b"], [None] * 2, [None] * 2))


def test_last_commit_wins_and_searchers_drop_the_old_id_in_the_same_commit(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store, coord = LocalStore(tmp_path), Coordinator(redis_client, LAYOUT)
    vectors = normalize(np.random.default_rng(0).normal(size=(4, 8)))

    def segment(name: str, ids: list[int], keyed: list[tuple[str, int, str]]) -> tuple[int, list]:
        key = LAYOUT.segment(name)
        store.put(key, encode_segment(np.array(ids), vectors[: len(ids)]))
        return coord.commit(key, images=len(ids), keyed=keyed)

    assert segment("a", [1, 2], [("k", 1, "s1"), ("m", 2, "s2")]) == (1, [])
    searcher = Searcher(store, coord, LAYOUT)
    searcher.load()
    assert len(searcher) == 2
    # Batch b (ids 10, 11) commits last although c's ids are lower: b wins; k's id 1 and c's 3 go.
    assert segment("c", [3], [("k", 3, "s3")]) == (2, [(1, "k")])
    assert segment("b", [10, 11], [("k", 10, "s4"), ("k", 11, "s5")]) == (3, [(3, "k"), (10, "k")])
    assert segment("b", [10, 11], []) == (3, [(3, "k"), (10, "k")])  # published once, same answer
    assert coord.lookup("k") == {"key": "k", "id": 11, "sequence": 3, "sha256": "s5"}
    assert coord.keys_of([1, 2, 3, 11]) == [None, "m", None, "k"]
    assert coord.image_count() == 2  # 5 rows added, 3 replaced
    searcher.refresh()  # no tombstone commit was published: the segments' commits did it
    assert sorted(np.flatnonzero(searcher.index.ids._bits).tolist()) == [2, 11]  # type: ignore[union-attr]
    segment("e", [20], [('ключ/é "q"', 20, "s6")])
    assert segment("f", [21], [('ключ/é "q"', 21, "s7")])[1] == [(20, 'ключ/é "q"')]
    assert coord.lookup('ключ/é "q"')["id"] == 21  # type: ignore[index]
    searcher.refresh()
    assert np.flatnonzero(searcher.index.ids._bits).tolist() == [2, 11, 21]  # type: ignore[union-attr]
    compact_manifest = compact_parts(store, coord)
    assert compact_manifest["count"] == 3
    # A tombstone removes by id and forgets the key in the same commit.
    store.put(LAYOUT.tombstone(11), json.dumps({"id": 11}).encode())
    coord.publish(LAYOUT.tombstone(11), images=-1, removes=11)
    assert coord.lookup("k") is None and coord.keys_of([11]) == [None]


def compact_parts(store: LocalStore, coord: Coordinator) -> dict[str, Any]:
    from pupyl_queue.compaction import Compactor

    return Compactor(store, coord, Settings()).run({"metric": "cosine", "dim": 8})


# --- through the pipeline
def test_lists_carry_keys_and_attributes_and_bad_ones_fail_alone(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    pics = tmp_path / "pics"
    paths = [image(pics, seed) for seed in range(5)]
    listing = write_list(
        tmp_path / "list.jsonl",
        [
            {"uri": str(paths[0]), "key": "sku-0", "attributes": {"color": "red", "price": 10}},
            {"uri": str(paths[1]), "key": "x" * 257},
            {"uri": str(paths[2]), "key": "sku-2", "attributes": {"nested": {"no": 1}}},
            {"uri": str(paths[3]), "key": "sku-3", "attributes": {"tags": ["a", "b"]}},
            {"uri": str(paths[4])},
        ],
    )
    items = index_folder(rt, listing, tiny_model)
    assert [item["status"] for item in items] == ["indexed", "failed", "failed", "indexed", "indexed"]
    assert "at most 256 bytes" in items[1]["error"] and "nested objects" in items[2]["error"]
    assert items[0]["key"] == "sku-0" and "key" not in items[4]
    coord = rt.coordinator("default")
    assert coord.lookup("sku-0")["id"] == items[0]["id"]  # type: ignore[index]
    assert coord.lookup("sku-2") is None
    hit = by_image(rt, paths[0], top=1)[0]
    assert (hit["id"], hit["key"]) == (items[0]["id"], "sku-0")
    assert hit["metadata"]["attributes"] == {"color": "red", "price": 10}
    assert hit["metadata"]["key"] == "sku-0"
    assert hit["metadata"]["internal_path"] == f"{rt.store.url.rstrip('/')}/{LAYOUT.image(items[0]['id'])}"
    assert "key" not in by_image(rt, paths[4], top=1)[0]


def test_upsert_replaces_and_same_bytes_are_unchanged(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    old, new = image(tmp_path / "old", 1), image(tmp_path / "new", 2)
    first = index_folder(rt, old, tiny_model, key="sku", attributes={"v": 1})
    assert first[0]["status"] == "indexed"
    coord = rt.coordinator("default")
    sequence = coord.last_sequence()
    again = index_folder(rt, old, tiny_model, key="sku", attributes={"v": 1})
    assert again == [{"ref": str(old), "status": "unchanged", "id": first[0]["id"], "key": "sku"}]
    assert coord.last_sequence() == sequence and coord.image_count() == 1  # nothing new committed
    job = rt.redis.hgetall(LAYOUT.job_key(_jobs(rt)[-1]))
    assert job["unchanged"] == "1"

    second = index_folder(rt, new, tiny_model, key="sku", attributes={"v": 2})
    new_id = second[0]["id"]
    assert second[0]["status"] == "indexed" and new_id != first[0]["id"]
    assert coord.lookup("sku")["id"] == new_id and coord.image_count() == 1  # type: ignore[index]
    hits = by_image(rt, new)
    assert (hits[0]["id"], hits[0]["key"]) == (new_id, "sku")
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert first[0]["id"] not in {h["id"] for h in hits} and len(hits) == 1
    assert not rt.store.exists(LAYOUT.image(first[0]["id"]))  # the old image's files went
    assert read_one(rt.store, rt.redis, LAYOUT, first[0]["id"]) is None  # and its metadata reads as gone
    tombstone = json.loads(rt.store.get(LAYOUT.tombstone(first[0]["id"])))
    assert (tombstone["key"], tombstone["replaced_by"]) == ("sku", new_id)
    # The old bytes are new content for this key again: indexed, not a duplicate of a dead id.
    back = index_folder(rt, old, tiny_model, key="sku", check_unique=True)
    assert back[0]["status"] == "indexed" and live_ids(rt) == {back[0]["id"]}


def _jobs(rt: Runtime) -> list[str]:
    return rt.redis.zrange(f"{C.REDIS_PREFIX}:{C.KEY_RECENT_JOBS}", 0, -1)


def test_a_key_given_for_a_folder_fails_the_images_after_the_first(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    folder = pattern_folder(tmp_path / "two", range(2))
    items = index_folder(rt, folder, tiny_model, key="one")
    assert [i["status"] for i in items] == ["indexed", "failed"]
    assert "one key" in items[1]["error"]


def test_two_jobs_upserting_the_same_keys_the_last_commit_wins_and_rebuild_agrees(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    """Job A gets its ids first but commits last: A's ids win, though B's are higher (rebuild must not
    take the higher id: it finds B's replaced ids tombstoned in the store)."""
    keys = [f"sku-{n}" for n in range(4)]
    lists = {
        name: write_list(
            tmp_path / f"{name}.jsonl",
            [{"uri": str(image(tmp_path / name, seed)), "key": key} for key, seed in zip(keys, seeds)],
        )
        for name, seeds in (("a", range(4)), ("b", range(10, 14)))
    }
    batches = {name: expand_folder(rt, path, tiny_model) for name, path in lists.items()}
    for name in ("a", "b"):  # ids: a's first
        rt.coordinator("default").allocate_ids(f"{batches[name][0]['job_id']}-000000", 4)
    b = embed_batch(rt, batches["b"][0])["items"]
    a = embed_batch(rt, batches["a"][0])["items"]
    assert max(i["id"] for i in a) < min(i["id"] for i in b)
    coord = rt.coordinator("default")
    assert [coord.lookup(k)["id"] for k in keys] == [i["id"] for i in a]  # type: ignore[index]
    assert live_ids(rt) == {i["id"] for i in a} and coord.image_count() == 4

    compact(rt, {"collection": "default"})
    expected = {k: coord.lookup(k) for k in keys}
    redis_client.flushdb()
    report = rebuild(rt.store, redis_client, "default")
    assert (report["keys"], report["key_conflicts"]) == (4, 0)
    assert {k: coord.lookup(k)["id"] for k in keys} == {k: v["id"] for k, v in expected.items()}  # type: ignore[index]
    assert live_ids(Runtime(rt.settings)) == {i["id"] for i in a}


def test_remove_by_key_compaction_rebuild_and_restore_keep_the_map(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    paths = [image(tmp_path / "p", seed) for seed in range(4)]
    rows = [{"uri": str(p), "key": f"k{n}", "attributes": {"n": n}} for n, p in enumerate(paths)]
    items = index_folder(rt, write_list(tmp_path / "l.jsonl", rows), tiny_model)
    compact(rt, {"collection": "default"})  # the map now rests on a snapshot's vector files
    replaced = index_folder(rt, image(tmp_path / "q", 50), tiny_model, key="k1")[0]
    gone = remove(rt, {"collection": "default", "key": "k2"})
    assert gone["removed"] and gone["id"] == items[2]["id"] and gone["key"] == "k2"
    assert remove(rt, {"collection": "default", "key": "k2"})["removed"] is False
    compact(rt, {"collection": "default"})
    compact(rt, {"collection": "default"})  # nothing new: skipped
    index_folder(rt, image(tmp_path / "r", 60), tiny_model)  # a commit after the snapshot
    compact(rt, {"collection": "default"})  # GC collects the first segments: only vector files hold them
    coord = rt.coordinator("default")
    want = {"k0": items[0]["id"], "k1": replaced["id"], "k3": items[3]["id"]}
    assert {k: coord.lookup(k)["id"] for k in want} == want and coord.lookup("k2") is None  # type: ignore[index]

    archive = tmp_path / "backup.tar"
    backup(rt.store, redis_client, "default", str(archive), rt.settings)
    restored = restore(str(archive), rt.store, redis_client, rt.settings, as_name="copy")
    assert restored["keys"] == 3
    copy = Coordinator(redis_client, Layout("copy"))
    assert {k: copy.lookup(k)["id"] for k in want} == want and copy.lookup("k2") is None  # type: ignore[index]

    redis_client.flushdb()
    assert rebuild(rt.store, redis_client, "default")["keys"] == 3
    assert {k: coord.lookup(k)["id"] for k in want} == want and coord.lookup("k2") is None  # type: ignore[index]
    hits = by_image(Runtime(rt.settings), paths[0], top=10)
    assert hits[0]["key"] == "k0" and hits[0]["metadata"]["attributes"] == {"n": 0}
    assert items[1]["id"] not in {h["id"] for h in hits} and items[2]["id"] not in {h["id"] for h in hits}


def test_upsert_payload_key_on_uploads(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    """What PupylQueue.upsert sends for bytes: an upload job with one key (job-level ``key``)."""
    job_id = uuid.uuid4().hex
    rt.store.put(LAYOUT.upload(job_id, 0, "a.jpg"), encode(pattern(3), "JPEG"))
    rt.coordinator("default").create_job(job_id, {"collection": "default"})
    batches: list[dict[str, Any]] = []
    from pupyl_queue.ingest import expand_job

    expand_job(
        rt,
        {
            "job_id": job_id,
            "collection": "default",
            "uri": f"upload:{job_id}",
            "model": str(tiny_model),
            "key": "u1",
            "attributes": {"tags": ["x"]},
        },
        batches.append,
    )
    assert batches[0]["items"][0]["image_key"] == "u1"
    item = embed_batch(rt, batches[0])["items"][0]
    assert item["status"] == "indexed" and item["key"] == "u1"


def test_filtered_search_follows_the_commit_log_and_snapshots(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    paths = [image(tmp_path / "f", seed) for seed in range(6)]
    rows = [
        {"uri": str(p), "key": f"k{n}", "attributes": {"color": "red" if n % 2 else "blue", "price": n * 10}}
        for n, p in enumerate(paths)
    ]
    items = index_folder(rt, write_list(tmp_path / "f.jsonl", rows), tiny_model)
    ids = [item["id"] for item in items]

    def filtered(runtime: Runtime, spec: Any, top: int = 10) -> list[int]:
        query = {"image_b64": base64.b64encode(paths[0].read_bytes()).decode()}
        task = {"collection": "default", "query": query, "top": top, "filter": spec}
        return [row["id"] for row in search(runtime, task)["results"]]

    assert sorted(filtered(rt, {"color": "red"})) == [ids[1], ids[3], ids[5]]
    assert len(filtered(rt, {"color": "red"}, top=1)) == 1
    assert sorted(filtered(rt, {"color": "red", "price": {"lt": 35}})) == [ids[1], ids[3]]
    assert sorted(filtered(rt, {"format": "JPEG", "price": {"gte": 40}})) == [ids[4], ids[5]]
    assert filtered(rt, {"color": "green"}) == []
    with pytest.raises(Exception, match="filter"):
        filtered(rt, {"price": {"near": 3}})

    compact(rt, {"collection": "default"})
    after_snapshot = Runtime(rt.settings)  # a search worker started now loads the rows file
    assert sorted(filtered(after_snapshot, {"color": "red"})) == [ids[1], ids[3], ids[5]]
    # Replace k1 by a blue image, remove k3: the filter follows both, in both searchers.
    new = index_folder(rt, image(tmp_path / "g", 70), tiny_model, key="k1", attributes={"color": "blue"})[0]
    remove(rt, {"collection": "default", "key": "k3"})
    for runtime in (rt, after_snapshot):
        assert filtered(runtime, {"color": "red"}) == [ids[5]]
        assert new["id"] in filtered(runtime, {"color": "blue"})


def test_set_attributes_reuses_the_vector_under_a_new_id(
    rt: Runtime, tmp_path: Path, tiny_model: Path, redis_client: redis.Redis
) -> None:
    path = image(tmp_path / "s", 5)
    first = index_folder(rt, path, tiny_model, key="k", attributes={"color": "red"})[0]
    coord = rt.coordinator("default")
    task = {
        "collection": "default",
        "key": "k",
        "attributes": {"color": "green", "size": 3},
        "update_id": "ab" * 8,
    }
    done = set_attributes(rt, task)
    assert done["updated"] and done["replaced"] == first["id"] and done["id"] != first["id"]
    sequence = coord.last_sequence()
    assert set_attributes(rt, task) == {key: done[key] for key in ("key", "updated", "id", "sequence")}
    assert coord.last_sequence() == sequence  # a redelivery commits nothing new
    assert coord.lookup("k")["id"] == done["id"] and coord.image_count() == 1  # type: ignore[index]
    hit = by_image(rt, path, top=5)
    assert len(hit) == 1 and (hit[0]["id"], hit[0]["key"]) == (done["id"], "k")
    assert hit[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert hit[0]["metadata"]["attributes"] == {"color": "green", "size": 3}
    query = {"image_b64": base64.b64encode(path.read_bytes()).decode()}
    green = search(rt, {"collection": "default", "query": query, "top": 5, "filter": {"color": "green"}})
    red = search(rt, {"collection": "default", "query": query, "top": 5, "filter": {"color": "red"}})
    assert [r["id"] for r in green["results"]] == [done["id"]] and red["results"] == []
    missing = set_attributes(rt, {"collection": "default", "key": "nope", "attributes": {}})
    assert missing["updated"] is False and "no image with key" in missing["reason"]
    with pytest.raises(Exception, match="nested objects"):
        set_attributes(rt, {"collection": "default", "key": "k", "attributes": {"a": {"b": 1}}})
    # The same bytes upserted again under the key are unchanged: the content did not change.
    assert index_folder(rt, path, tiny_model, key="k")[0]["status"] == "unchanged"
    assert read_one(rt.store, rt.redis, LAYOUT, first["id"]) is None
    assert read_one(rt.store, rt.redis, LAYOUT, done["id"])["replaces"] == first["id"]  # type: ignore[index]
    redis_client.flushdb()
    rebuild(rt.store, redis_client, "default")
    assert coord.lookup("k")["id"] == done["id"]  # type: ignore[index]
    assert read_one(rt.store, redis_client, LAYOUT, first["id"]) is None
    assert read_one(rt.store, redis_client, LAYOUT, done["id"])["attributes"] == task["attributes"]  # type: ignore[index]


def test_a_commit_that_expects_another_id_changes_nothing(redis_client: redis.Redis) -> None:
    coord = Coordinator(redis_client, LAYOUT)
    assert coord.commit("s/a", images=1, keyed=[("k", 3, "aa")]) == (1, [])
    assert coord.commit("s/b", images=1, keyed=[("k", 5, "bb")], expect=4) == (0, [])
    assert coord.commit("s/c", images=1, keyed=[("x", 6, "cc")], expect=6) == (0, [])  # x names nothing
    assert coord.last_sequence() == 1 and coord.lookup("k")["id"] == 3  # type: ignore[index]
    assert coord.commit("s/b", images=1, keyed=[("k", 5, "bb")], expect=3) == (2, [(3, "k")])
