"""Embed workers in a container's 64 MB /dev/shm (docker's and Kubernetes' default).

Pixels go from the decode processes to the network through /dev/shm, 38.5 MB per batch of 256.
Two such batches at once did not fit: a decode process died of SIGBUS writing a page, and the
pool could not even restart (its semaphores live there too), so the batch's task failed. Now a
block's pages are reserved when it is made, and a batch that finds no room decodes in the
worker's threads, with a warning that says what to change. The test gives a child process a
64 MB /dev/shm of its own (a private mount namespace: needs root, as in CI's container).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def can_mount_tmpfs() -> bool:
    try:
        probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_two_batches_of_256_in_a_64_mb_dev_shm_are_all_indexed(
    redis_url: str, redis_client: object, tmp_path: Path, tiny_model: Path
) -> None:
    if not can_mount_tmpfs():
        pytest.skip("needs a private mount namespace (unshare -m, as root) for a 64 MB /dev/shm")
    child = f"{sys.executable} {ROOT / 'tests' / 'shm_child.py'} {redis_url} {tmp_path / 'data'} {tiny_model}"
    command = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {child}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"batches": 2, "indexed": 512, "errors": []}, out.stderr[-3000:]
    assert "no room in shared memory" in out.stderr and "shm_size" in out.stderr
