"""What writing each image's stored copy costs a decode process, to a local store and to S3.

    PYTHONPATH=. .venv/bin/python bench/s3_copies.py --photos /tmp/photos3k [--images 400] [--rounds 3]
    PYTHONPATH=. .venv/bin/python bench/s3_copies.py --endpoint host:port --access-key K --secret-key S

A decode process (pupyl_queue/decode_pool.py) decodes, squashes and stores each image of its group
(``_decode_group``, called here in this process, on the real code). On a GPU host these processes are
the ceiling, so any time one of them spends not decoding is throughput lost. This runs the same
photos through ``_decode_group`` in groups of ``--group`` (a batch of 256 over 15 processes is ~17),
this process pinned to the first core and the S3 server (moto_server unless ``--endpoint``) to the
last, and prints per image: wall time, this process's CPU and the server's CPU, for

- no copies (the decode ceiling of one core: what the pool does without a store),
- a local store (the embedded default: the put is a file written in place),
- S3, each put in line (the decode process waits for each response),
- S3 through the decode process's copy-writing threads (what a remote store gets now),

alternately, round by round. moto_server closes the connection after each response, so its puts
cost the client a TCP connect more than MinIO's (kept alive) do; ``--endpoint`` takes a real one.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pupyl_queue import decode_pool
from pupyl_queue.decode_pool import Copies, PixelSlots, _decode_group
from pupyl_queue.settings import Settings
from pupyl_queue.store import S3Store

SIZE = 224
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """A process's CPU seconds (user + system) from /proc: the server's, which this process does not see."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_moto(cpu: int) -> tuple[subprocess.Popen[bytes], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def run(
    datas: list[bytes], group: int, settings: Settings | None, remote_threads: bool, tag: str
) -> tuple[float, float]:
    """Wall and this process's CPU, in ms per image, for one pass of every photo."""
    S3Store.remote = remote_threads  # read by store.OverlappedWrites at each put
    slots = PixelSlots(group, SIZE)
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(datas), group):
        chunk = datas[first : first + group]
        copies = None
        if settings is not None:
            keys = [(f"{tag}/{first + n}.jpg", "") for n in range(len(chunk))]
            copies = Copies(settings, "local", keys)
        answers = _decode_group([(d, n) for n, d in enumerate(chunk)], 10**9, SIZE, slots.block, copies)
        assert all(error == "" for _, _, error in answers), answers
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    slots.close()
    return wall * 1000 / len(datas), cpu * 1000 / len(datas)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default="../shared/data/photos")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoint", default="", help="an S3 server host:port (default: start moto_server)")
    parser.add_argument("--access-key", default="bench")
    parser.add_argument("--secret-key", default="bench-secret")
    parser.add_argument("--server-pid", type=int, default=0, help="with --endpoint: its process, for its CPU")
    args = parser.parse_args()

    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    datas = [p.read_bytes() for p in files[: args.images]]
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    server, endpoint = (None, args.endpoint) if args.endpoint else start_moto(cpus[-1])
    server_pid = server.pid if server else args.server_pid
    print(
        f"{len(datas)} photos, {sum(map(len, datas)) / len(datas) / 1024:.0f} KB on average, groups of "
        f"{args.group}; this process on CPU {cpus[0]}, the S3 server ({endpoint}) on CPU {cpus[-1]}; "
        f"{decode_pool.COPY_WRITERS} copy-writing threads"
    )
    with tempfile.TemporaryDirectory(prefix="pupyl-s3-copies-") as tmp:
        local = Settings(store=Path(tmp).as_uri())
        s3 = Settings(
            store="s3://bench-copies/run",
            s3_endpoint=endpoint,
            s3_access_key=args.access_key,
            s3_secret_key=args.secret_key,
            s3_secure=False,
        )
        variants = {
            "no copies (decode only)": (None, False),
            "local store": (local, False),
            "S3, each put in line": (s3, False),
            "S3, copy-writing threads": (s3, True),
        }
        run(datas[: args.group * 2], args.group, s3, True, "warm")  # imports, the bucket, connections
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (settings, threads) in variants.items():
                server_cpu = process_cpu(server_pid) if server_pid else 0.0
                wall, cpu = run(datas, args.group, settings, threads, f"r{round_}")
                served = (process_cpu(server_pid) - server_cpu) * 1000 / len(datas) if server_pid else 0.0
                results[name].append((wall, cpu, served))
                print(f"round {round_}: {name}: wall {wall:.2f} ms, CPU {cpu:.2f} ms, server {served:.2f} ms")
    if server:
        server.kill()
    base = statistics.median(w for w, _, _ in results["no copies (decode only)"])
    print(
        "\n| variant | wall ms per image (median) | img/s of one process | of decode only "
        "| process CPU ms | server CPU ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        served = statistics.median(r[2] for r in rows)
        print(f"| {name} | {wall:.2f} | {1000 / wall:.0f} | {base / wall:.0%} | {cpu:.2f} | {served:.2f} |")


if __name__ == "__main__":
    main()
