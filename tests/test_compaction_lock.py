"""The compaction lock: renewed while a compaction runs, so a short lifetime never cuts a long run short.

(That it lapses soon after its holder is killed is in test_faults_search.py, with real workers.)
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from pupyl_queue import queries
from pupyl_queue.compaction import Compactor
from pupyl_queue.layout import Layout
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings


def test_lock_outlives_its_ttl_while_the_compaction_runs(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path, redis_url=redis_url, compact_lock_s=3))
    lock = Layout().key("compact-lock")
    seen: list[int] = []

    def slow_run(self: Compactor, model: dict[str, Any]) -> dict[str, Any]:
        if seen:  # a second compaction got the lock: it had lapsed
            return {"watermark": 2}
        for _ in range(10):  # 5 s: longer than the 3 s lock
            seen.append(redis_client.pttl(lock))
            time.sleep(0.5)
        # A second compaction meanwhile is turned away: the lock is still held.
        assert (
            queries.compact(rt, {"collection": "default"}).get("skipped") == "another compaction is running"
        )
        return {"watermark": 1}

    monkeypatch.setattr(Compactor, "run", slow_run)
    monkeypatch.setattr(Runtime, "spec", lambda self, collection: SimpleNamespace(to_json=dict))
    assert queries.compact(rt, {"collection": "default"}) == {"watermark": 1}
    assert len(seen) == 10 and min(seen) > 0  # renewed: it never lapsed
    assert not redis_client.exists(lock)  # released at the end
