"""Keys and upserts through real Celery workers: two embed workers racing on the same keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupyl_queue import PupylQueue, Settings
from tests.imagegen import encode, pattern
from tests.workers import Workers

pytestmark = pytest.mark.slow
KEYS = [f"sku-{n}" for n in range(6)]


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[PupylQueue, Workers]]:
    home = tmp_path_factory.mktemp("keys-stack")
    settings = Settings(data_dir=home / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/4")
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    workers = Workers(settings, home)
    workers.start()
    workers.start_extra("embed")
    yield client, workers
    client.close()
    workers.stop_all()


def listing(folder: Path, seeds: range, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for key, seed in zip(KEYS, seeds):
        path = folder / f"{seed}.jpg"
        path.write_bytes(encode(pattern(seed), "JPEG"))
        lines.append(
            json.dumps({"uri": str(path), "key": key, "attributes": {"seed": seed, **(extra or {})}})
        )
    out = folder / "list.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_concurrent_upserts_leave_one_live_id_per_key(
    stack: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    client, workers = stack
    first = client.index(listing(tmp_path / "a", range(0, 6)))
    second = client.index(listing(tmp_path / "b", range(20, 26)))  # the same keys, other images
    try:
        for job in (first, second):
            assert job.wait(timeout=300)["indexed"] == len(KEYS)
    finally:
        workers.check_alive()
    # Each job is one batch, one commit: every key ends on the row of the job that committed last.
    winner, loser = sorted((first, second), key=lambda job: job.sequence, reverse=True)
    won = {item["key"]: item["id"] for item in winner.report()}
    assert {key: client.lookup(key)["id"] for key in KEYS} == won  # type: ignore[index]
    answer = client.search_async(tmp_path / "a" / "0.jpg", top=20, min_sequence=winner.sequence).get(
        timeout=60
    )
    assert answer["count"] == len(KEYS)
    assert {row["id"]: row["key"] for row in answer["results"]} == {i: k for k, i in won.items()}
    assert not {item["id"] for item in loser.report()} & {row["id"] for row in answer["results"]}
    low = 20 if winner is second else 0  # the winner's images have seeds low..low+5
    query = tmp_path / "a" / "0.jpg"
    assert set(client.search(query, top=20, filter={"seed": {"gte": low, "lt": low + 6}})) == set(
        won.values()
    )
    assert client.search(query, top=20, filter={"seed": {"gte": 20 - low, "lt": 26 - low}}) == []

    # The same bytes again under the same key: unchanged; other bytes: replaced, found at distance 0.
    kept = next(item for item in winner.report() if item["key"] == "sku-0")
    same = client.upsert(Path(kept["ref"]).read_bytes(), key="sku-0")
    assert (same["status"], same["id"]) == ("unchanged", kept["id"])
    fresh = tmp_path / "new.jpg"
    fresh.write_bytes(encode(pattern(77), "JPEG"))
    done = client.upsert(fresh, key="sku-0", attributes={"color": "blue"})
    assert done["status"] == "indexed" and client.lookup("sku-0")["id"] == done["id"]  # type: ignore[index]
    hits = client.search(fresh, top=3, return_metadata=True, min_sequence=done["sequence"])
    assert (hits[0]["id"], hits[0]["key"], hits[0]["attributes"]) == (done["id"], "sku-0", {"color": "blue"})
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert kept["id"] not in client.search(fresh, top=20)

    changed = client.set_attributes("sku-0", {"color": "green"})
    assert changed["updated"] and changed["replaced"] == done["id"]
    green = client.search(fresh, top=5, filter={"color": "green"}, min_sequence=changed["sequence"])
    assert green == [changed["id"]] and client.search(fresh, top=5, filter={"color": "blue"}) == []

    bad = client.index(listing(tmp_path / "c", range(40, 46), extra={"bad": {"nested": 1}}))
    state = bad.wait(timeout=300)
    assert (state["indexed"], state["failed"]) == (0, len(KEYS))
    assert all("nested objects" in item["error"] for item in bad.failures())

    removed = client.remove(key="sku-1")
    assert removed["removed"] and removed["id"] == won["sku-1"] and client.lookup("sku-1") is None
    after = client.search_async(fresh, top=20, min_sequence=removed["sequence"]).get(timeout=60)
    assert won["sku-1"] not in {row["id"] for row in after["results"]} and after["count"] == len(KEYS) - 1
    workers.check_alive()
