"""Two search shards and a router, as real worker processes, answer as one index does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import PupylQueue, TaskFailed
from pupyl_queue.queries import compact
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.stack import start_worker
from tests.imagegen import encode, pattern
from tests.indexing import index_folder

pytestmark = pytest.mark.slow


def test_two_shards_answer_as_one_index(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/7", search_timeout=8
    )
    rt = Runtime(settings)
    rt.redis.flushdb()
    for n, seeds in enumerate((range(0, 14), range(30, 40))):
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        for seed in seeds:
            (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
        index_folder(rt, folder, tiny_model)
        if n == 0:
            compact(rt, {"collection": "default"})  # shards load the snapshot, then apply later commits
    one = rt.searcher("default")
    queries = [tmp_path / "f0" / "3.png", tmp_path / "f1" / "35.png"]
    expected = [one.search(rt.extractor("default").embed(_pixels(q))[0], 10) for q in queries]

    sharded = settings.replace(search_shards=2)
    procs = [
        start_worker("search.shard0", sharded.replace(search_shard=0), log_path=tmp_path / "s0.log"),
        start_worker("search.shard1", sharded.replace(search_shard=1), log_path=tmp_path / "s1.log"),
        start_worker("search", sharded, log_path=tmp_path / "router.log"),
    ]
    client = PupylQueue(settings=sharded)
    try:
        for query, want in zip(queries, expected):
            answer = client.search_async(query, top=10).get(timeout=120)
            got = [(r["id"], r["distance"]) for r in answer["results"]]
            assert [i for i, _ in got] == [i for i, _ in want]
            assert [d for _, d in got] == pytest.approx([d for _, d in want], abs=1e-5)
            assert answer["partial"] is False and answer["count"] == 24
        assert client.search(expected[0][0][0], top=1) == [
            expected[0][0][0]
        ]  # "more like" via the owner shard

        procs[1].kill()  # shard 1 dies
        procs[1].wait()
        with pytest.raises(TaskFailed, match=r"shards \[1\] of 2 did not answer"):
            client.search(queries[0], top=10, timeout=120)
        partial = client.search_async(queries[0], top=10, allow_partial=True).get(timeout=120)
        assert partial["partial"] is True and partial["missing_shards"] == [1]
        assert {r["id"] % 2 for r in partial["results"]} == {0}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        client.close()


def _pixels(path: Path) -> np.ndarray:
    from pupyl_queue.images import decode

    return decode(path.read_bytes(), 10**8, target=224).pixels(224)[None]
