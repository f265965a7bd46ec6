"""Real Celery worker processes for integration tests, started like ``pupyl-queue up`` does."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from pupyl_queue import constants as C
from pupyl_queue.settings import Settings
from pupyl_queue.stack import start_worker, stop


class Workers:
    """One worker per queue; each can be stopped, killed or restarted."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *queues: str) -> None:
        for queue in queues or C.QUEUES:
            self.procs[queue] = start_worker(queue, self.settings, log_path=self.log_dir / f"{queue}.log")

    def start_extra(self, queue: str) -> None:
        """One more worker on a queue (e.g. a second embed worker)."""
        name = f"{queue}-{len(self.procs)}"
        self.procs[name] = start_worker(queue, self.settings, log_path=self.log_dir / f"{name}.log")

    def start_named(
        self, name: str, queue: str, settings: Settings, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker on ``queue`` with its own settings (e.g. PUPYL_EMBED_CONCURRENCY) or environment."""
        self.procs[name] = start_worker(queue, settings, env=env, log_path=self.log_dir / f"{name}.log")
        return self.procs[name]

    def stop_named(self, prefix: str) -> None:
        """Stop (and forget) every worker whose name starts with ``prefix``."""
        stop_together([self.procs.pop(n) for n in [n for n in self.procs if n.startswith(prefix)]])

    def restart(self, queue: str) -> None:
        stop(self.procs[queue])
        self.start(queue)

    def stop_all(self) -> None:
        stop_together(self.procs.values())

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )

    def check_alive(self) -> None:
        dead = {q: p.returncode for q, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"workers died: {dead}\n{self.logs()}"


def thread_stat(pid: int | str, tid: int | str) -> tuple[str, float, int]:
    """A thread's name, CPU seconds (user + system) and nice value, from /proc/<pid>/task/<tid>/stat."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 on: the name may hold spaces
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return stat[stat.index("(") + 1 : stat.rindex(")")], cpu, int(fields[16])


def thread_niceness(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of a process: its name and nice value."""
    found = {}
    for tid in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, _, nice = thread_stat(pid, tid.name)
        except OSError:  # exited meanwhile
            continue
        found[int(tid.name)] = (name, nice)
    return found


def stop_together(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Warm shutdown of several workers at once: SIGTERM to each, then wait, SIGKILL what lingers.

    Each warm shutdown takes a second or two (the decode pool, the liveness records, the broker
    connection); one after another, a four-worker stack spent most of that waiting in turn.
    The same signals and limit as pupyl_queue.stack.stop, which does it for one process.
    """
    live = [proc for proc in procs if proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
