"""Fast companions of tests/test_faults.py: a redelivered expansion, and the exactly-once check itself.

Real Redis and a real store, in-process (no Celery), so they run in the quick suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pupyl_queue.coordination import read_job
from pupyl_queue.embedding import embed_batch
from pupyl_queue.ingest import expand_job
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.faults import Audit, assert_exactly_once
from tests.imagegen import encode, pattern
from tests.indexing import expand_folder


@pytest.fixture
def rt(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    url = redis_url.rsplit("/", 1)[0] + "/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield Runtime(Settings(data_dir=tmp_path, redis_url=url, batch_size=4))
    client.flushdb()
    client.close()


def test_expansion_redelivered_after_the_job_is_done(rt: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    """An index task whose ack was lost (Redis restarted) runs again: it must not reopen the job."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(6):
        (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    batches = expand_folder(rt, folder, tiny_model, job_id="j1")
    for batch in batches:
        embed_batch(rt, batch)
    assert (read_job(rt.redis, "j1") or {})["state"] == "done"

    again: list[dict[str, object]] = []
    request = {"job_id": "j1", "collection": "default", "uri": str(folder), "model": str(tiny_model)}
    result = expand_job(rt, {**request, "origin": "local"}, again.append)
    assert again == []  # nothing dispatched twice
    assert result == {"job_id": "j1", "total": 6, "batches": len(batches)}
    state = read_job(rt.redis, "j1") or {}
    assert (state["state"], state["indexed"], state["batches_done"]) == ("done", 6, len(batches))


def test_expansion_rerun_after_some_batches_finished_leaves_no_staged_copy(
    rt: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """An expansion interrupted (Redis down) and run again stages the early batches a second time."""
    rt = Runtime(rt.settings.replace(inline_item_bytes=0))  # every image through the staging area
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(6):
        (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    first = expand_folder(rt, folder, tiny_model, job_id="j2")
    embed_batch(rt, first[0])  # done before the expansion is run again
    rt.redis.hdel(Layout().job_key("j2"), "expanded")  # as if the first run had stopped before its end
    again: list[dict[str, object]] = []
    request = {"job_id": "j2", "collection": "default", "uri": str(folder), "model": str(tiny_model)}
    expand_job(rt, {**request, "origin": "local"}, again.append)
    assert [b["items"] for b in again] == [b["items"] for b in first]  # the same batches, the same keys
    for batch in again:
        embed_batch(rt, batch)
    state = read_job(rt.redis, "j2") or {}
    assert (state["state"], state["indexed"]) == ("done", 6)
    assert list(rt.store.list(Layout().staging("j2") + "/")) == []


def good_audit() -> tuple[Audit, dict[Path, str]]:
    files = {Path("a.jpg"): "sha-a", Path("b.jpg"): "sha-b", Path("copy-a.jpg"): "sha-a"}
    root = Layout().root
    audit = Audit(
        indexed_ids=[1, 2],
        duplicates=1,
        failed=0,
        segment_ids=[1, 2],
        image_ids={1, 2},
        meta_shas=["sha-a", "sha-b"],
        searcher_ids=[2, 1],
        keys=[
            f"{root}/manifest.json",
            f"{root}/images/1.jpg",
            f"{root}/meta/j-000000.json",
            f"{root}/segments/j-000000.npz",
        ],
        commit_keys=[f"{root}/segments/j-000000.npz"],
    )
    return audit, files


@pytest.mark.parametrize(
    "fault",
    [
        {"segment_ids": [1, 2, 2]},  # a batch committed twice
        {"searcher_ids": [1, 2, 2]},  # an id twice in the index
        {"searcher_ids": [1]},  # lost from the index
        {"image_ids": {1, 2, 3}},  # an orphan image object
        {"meta_shas": ["sha-a", "sha-a"]},  # one content indexed twice
        {"indexed_ids": [1, 2, 3], "segment_ids": [1, 2, 3], "image_ids": {1, 2, 3}},  # a copy indexed
        {"failed": 1},
        {"keys": [f"{Layout().root}/staging/j/0"]},  # a staged object left behind
        {"keys": [f"{Layout().root}/meta/j-000001.json"]},  # a metadata object of no committed batch
        {"commit_keys": []},  # a segment no commit refers to
    ],
)
def test_exactly_once_check_catches(fault: dict[str, object]) -> None:
    audit, files = good_audit()
    assert_exactly_once(audit, files, Layout())  # the good one passes
    for name, value in fault.items():
        if name == "keys":
            value = audit.keys + list(value)  # type: ignore[call-overload]
        setattr(audit, name, value)
    with pytest.raises(AssertionError):
        assert_exactly_once(audit, files, Layout())
