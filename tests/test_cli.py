"""The ``pupyl-queue`` command: ``up`` runs the whole local stack; the verbs talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pupyl_queue.stack import free_port, wait_for_port

pytestmark = pytest.mark.slow


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pupyl_queue.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_index_search_remove_and_clean_stop(tmp_path: Path, tiny_model: Path, photo_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUPYL_")}
    flower_port = free_port()  # not the default 5555: another stack may hold it
    env.update(PUPYL_DATA_DIR=str(tmp_path / "data"), PUPYL_MODEL=str(tiny_model))
    env.update(PUPYL_FLOWER_PORT=str(flower_port))
    up = subprocess.Popen(
        [sys.executable, "-m", "pupyl_queue.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stack_file = tmp_path / "data" / "stack.json"
        deadline = time.monotonic() + 60
        while not stack_file.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "pupyl-queue up did not start"
            time.sleep(0.2)
        wait_for_port(flower_port, None, "flower", 60)  # its API and auth: test_flower.py
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6  # redis-server, four workers and Flower

        done = cli(env, "index", str(photo_dir), "--wait")
        assert done.returncode == 0, done.stderr
        assert "done" in done.stdout and "2 failed" in done.stdout
        assert "not an image" in done.stdout  # failures are listed with reasons

        query = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name != "truncated.jpg")
        found = cli(env, "--json", "search", str(query), "--top", "2")
        assert found.returncode == 0, found.stderr
        hits = json.loads(found.stdout)
        assert hits[0]["original_file_name"] == query.name and hits[0]["distance"] < 1e-4

        # a worker killed -9 is started anew by `up`, and the stack answers as before
        search_worker = next(c for c in children if "-Q search " in " ".join(c.cmdline()) + " ")
        search_worker.kill()
        search_worker.wait(timeout=10)
        again = cli(env, "--json", "search", str(query), "--top", "2")
        assert again.returncode == 0 and json.loads(again.stdout) == hits, again.stderr
        replaced = psutil.Process(up.pid).children(recursive=True)
        assert any("-Q search " in " ".join(c.cmdline()) + " " for c in replaced)
        children = replaced

        removed = cli(env, "remove", str(hits[0]["id"]))
        assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] is True
        plain = cli(env, "search", str(query), "--top", "3", "--distances")
        assert f"id {hits[0]['id']} " not in plain.stdout and plain.stdout.count("distance") == 3

        missing = cli(env, "search", str(tmp_path / "nope.jpg"))
        assert missing.returncode == 2 and "not found" in missing.stderr
        bad = cli(env, "search", str(photo_dir / "truncated.jpg"))
        assert bad.returncode == 2 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not (tmp_path / "data" / "stack.json").exists()
    assert list((tmp_path / "data" / "redis").glob("appendonly*"))  # persisted under the data dir


def test_key_verbs_refuse_bad_input_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    """Checked before anything is sent: no Redis is needed to refuse these."""
    from pupyl_queue.cli import attribute_value

    assert [attribute_value(v) for v in ("59", "1.5", "true", '["a", "b"]', '"042"', "red shoe", "null")] == [
        59, 1.5, True, ["a", "b"], "042", "red shoe", "null",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUPYL_")}
    env["PUPYL_DATA_DIR"] = str(tmp_path)
    cases = [
        (["index", "x.jpg", "--attr", "a=1"], "--attr needs --key"),
        (["index", "x.jpg", "--key", "k", "--attr", "id=1"], "reserved"),
        (["index", "x.jpg", "--key", "k", "--attr", "a=1", "--attr", "a=2"], "given twice"),
        (["index", "x.jpg", "--key", "k" * 300], "at most 256 bytes"),
        (["search", "q.jpg", "--where", "{"], "--where takes a JSON filter"),
        (["search", "q.jpg", "--where", '{"price": {"lt": "x"}}'], "range bound"),
        (["remove"], "an image id or --key"),
        (["remove", "3", "--key", "k"], "an image id or --key"),
        (["set-attributes", "k", "--attr", "novalue"], "name=value"),
    ]
    for args, message in cases:
        done = cli(env, *args, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
