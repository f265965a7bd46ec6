"""Flower on the workers' broker, behind basic auth: its API lists every kind of worker and a job's tasks."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import redis

from pupyl_queue import PupylQueue, Settings
from pupyl_queue import constants as C
from pupyl_queue.settings import SettingsError
from pupyl_queue.stack import flower_command, flower_env, free_port, start_flower, stop, wait_for_port
from tests.workers import Workers

T = TypeVar("T")


def test_flower_command_line_holds_no_secret() -> None:
    settings = Settings(
        redis_url="redis://:redis-pw@127.0.0.1:1/0",
        flower_password="flower-pw",
        s3_secret_key="s3-pw",
        api_tokens="token-pw",
        flower_port=5999,
    )
    command = " ".join(flower_command(settings))
    assert "--port=5999" in command and "--address=127.0.0.1" in command
    assert not any(secret in command for secret in ("redis-pw", "flower-pw", "s3-pw", "token-pw"))
    env = flower_env(settings)
    assert env["FLOWER_BASIC_AUTH"] == "pupyl:flower-pw" and "FLOWER_UNAUTHENTICATED_API" not in env
    assert env["PUPYL_REDIS_URL"] == settings.redis_url  # the workers' broker
    assert "s3-pw" not in env.values() and "token-pw" not in env.values()  # Flower needs neither
    assert "flower-pw" not in repr(settings)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "PUPYL_FLOWER_PASSWORD is empty"),
        ({"flower_password": "a,b"}, "no ','"),
        ({"flower_password": "pw", "flower_user": "a:b"}, "no ':'"),
        ({"flower_auth": False, "flower_host": "0.0.0.0"}, "loopback"),
    ],
)
def test_flower_refuses_settings_it_cannot_run_safely(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        flower_env(Settings(**changes))


def test_flower_without_auth_on_loopback_opens_its_api() -> None:
    env = flower_env(Settings(flower_auth=False))
    assert env["FLOWER_UNAUTHENTICATED_API"] == "true" and "FLOWER_BASIC_AUTH" not in env


def poll(check: Callable[[], T | None], timeout: float, what: str, on_timeout: Callable[[], str]) -> T:
    """``check()`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s\n{on_timeout()}")
        time.sleep(0.5)


class FlowerApi:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def status(self, path: str, auth: str | None = None) -> int:
        request = urllib.request.Request(self.base + path, headers={"Authorization": auth} if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": self.auth})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def flower_stack(
    redis_url: str, tmp_path: Path, tiny_model: Path
) -> Iterator[tuple[Settings, Workers, subprocess.Popen[bytes], Path]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + "/11",
        flower_port=free_port(),
        flower_password=secrets.token_urlsafe(24),
    )
    with redis.Redis.from_url(settings.redis_url) as client:
        client.flushdb()
    workers = Workers(settings, tmp_path)
    flower_log = tmp_path / "flower.log"
    flower = start_flower(settings, flower_log, settings.flower_port)
    try:
        workers.start()
        wait_for_port(settings.flower_port, flower, "flower", timeout=60, log=flower_log)
        yield settings, workers, flower, flower_log
    finally:
        stop(flower)
        workers.stop_all()


@pytest.mark.slow
def test_flower_lists_every_kind_of_worker_and_a_jobs_tasks(
    flower_stack: tuple[Settings, Workers, subprocess.Popen[bytes], Path], tiny_model: Path, photo_dir: Path
) -> None:
    settings, workers, flower, flower_log = flower_stack
    api = FlowerApi(settings.flower_port, settings.flower_user, settings.flower_password)

    def diagnostics() -> str:
        return f"--- flower.log\n{flower_log.read_text(errors='replace')[-4000:]}\n{workers.logs()}"

    def kinds_seen() -> set[str] | None:
        workers.check_alive()
        assert flower.poll() is None, diagnostics()
        names = set(api.get("/api/workers?refresh=1"))
        kinds = {queue for queue in C.QUEUES for name in names if name.startswith(f"{queue}-")}
        return kinds if kinds == set(C.QUEUES) else None

    poll(kinds_seen, 180, "Flower did not list a worker of each kind", diagnostics)

    client = PupylQueue(settings=settings, model=tiny_model)
    try:
        job = client.index(photo_dir)
        state = job.wait(timeout=300)
        assert state["state"] == "done"
    finally:
        client.close()

    def job_tasks() -> dict[str, Any] | None:
        # Every batch's task seen to its end: Flower takes events in turn, and a task it knows only
        # from its "sent" event has no worker yet (a busy machine showed one: KeyError 'worker').
        tasks = api.get("/api/tasks")
        index = tasks.get(job.id)
        embeds = [t for t in tasks.values() if t["name"] == C.TASK_EMBED]
        ended = len(embeds) == state["batches_total"] and all(t["state"] == "SUCCESS" for t in embeds)
        return tasks if index and index["state"] == "SUCCESS" and ended else None

    tasks = poll(job_tasks, 60, "Flower did not show the job's tasks succeeded", diagnostics)
    assert tasks[job.id]["name"] == C.TASK_INDEX and tasks[job.id]["worker"].startswith(f"{C.QUEUE_INGEST}-")
    embeds = [t for t in tasks.values() if t["name"] == C.TASK_EMBED]
    assert embeds and all(t["worker"].startswith(f"{C.QUEUE_EMBED}-") for t in embeds)
    assert api.get(f"/api/task/info/{job.id}")["state"] == "SUCCESS"

    # Basic auth: nothing without the right credentials, the UI included.
    wrong = "Basic " + base64.b64encode(f"{settings.flower_user}:wrong".encode()).decode()
    assert api.status("/api/workers") == 401
    assert api.status("/api/tasks", auth=wrong) == 401
    assert api.status("/") == 401 and api.status("/", auth=api.auth) == 200
    # The password is on no command line and in no log line.
    assert not any(settings.flower_password in part for part in psutil.Process(flower.pid).cmdline())
    assert settings.flower_password not in flower_log.read_text(errors="replace")
    assert settings.flower_password not in workers.logs()
