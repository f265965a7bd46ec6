"""What a worker's receipt of one big message costs it and Redis, with and without the landed record.

    python bench/landed_delivery.py [--messages 100] [--rounds 5]

An embed batch of 64 small images carried inline is one ~1 MB message. On receipt, kombu
records the delivery by JSON-encoding the whole message again and sending it back to Redis
(``unacked``), and the landing list's entry was removed by value (LREM: the message once
more). Since session 12 both are Lua calls on the copy Redis already holds
(``broker_fixes._RECORD_LANDED``, ``_UNLAND``). "before" runs the same consumer with those
two calls refused, which is exactly kombu's way (the fallback the code keeps). One process,
one redis-server, real kombu transport; the messages are real embed payloads: 64 of the
128 px flowers each, inline (base64), as the ingest worker sends them.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

import redis  # noqa: E402
from kombu import Queue  # noqa: E402

from pupyl_queue import broker_fixes  # noqa: E402
from pupyl_queue.celery_app import make_app  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402
from pupyl_queue.stack import free_port, start_redis, stop  # noqa: E402

QUEUE = "bench-landed"


def batch_kwargs(files: list[Path]) -> dict[str, object]:
    items = [
        {"ref": str(f), "meta": {}, "data_b64": base64.b64encode(f.read_bytes()).decode()} for f in files
    ]
    return {"job_id": "bench", "collection": "bench", "batch": 0, "items": items}


def receive(app: object, r: redis.Redis, count: int) -> tuple[float, float, int]:
    """Worker CPU s, Redis CPU s and bytes sent up to Redis for receiving and acking ``count``."""
    got: list[object] = []

    def received(_body: object, message: object) -> None:
        got.append(message)

    def redis_cpu() -> float:
        cpu = r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    with app.connection_for_read() as conn:  # type: ignore[attr-defined]
        up0, rcpu0, cpu0 = int(r.info("stats")["total_net_input_bytes"]), redis_cpu(), time.process_time()
        with conn.Consumer([Queue(QUEUE)], callbacks=[received], accept=["json"]):
            while len(got) < count:
                conn.drain_events(timeout=10)
                while got:
                    got.pop().ack()  # type: ignore[attr-defined]
                    count -= 1
        cpu, rcpu = time.process_time() - cpu0, redis_cpu() - rcpu0
        up = int(r.info("stats")["total_net_input_bytes"]) - up0
    return cpu, rcpu, up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    flowers = sorted((SHARED / "flowers").rglob("*.jpg"))[:64]
    kwargs = batch_kwargs(flowers)
    real = (broker_fixes.record_landed, broker_fixes.unland_head)
    refused = (lambda *_a, **_k: False, lambda *_a, **_k: False)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis(Path(tmp), port, appendonly=False)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            app = make_app(Settings(redis_url=url), include_tasks=False)
            r = redis.Redis.from_url(url)
            broker_fixes.land_as("bench@host")
            size = 0
            results: dict[str, list[tuple[float, float, int]]] = {"before": [], "after": []}
            for n in range(args.rounds):
                for name in ("before", "after") if n % 2 == 0 else ("after", "before"):
                    for _ in range(args.messages):
                        app.send_task("pupyl.embed", kwargs=kwargs, queue=QUEUE)
                    size = len(r.lindex(QUEUE, 0) or b"")
                    broker_fixes.record_landed, broker_fixes.unland_head = (
                        real if name == "after" else refused
                    )
                    results[name].append(receive(app, r, args.messages))
            broker_fixes.record_landed, broker_fixes.unland_head = real
        finally:
            stop(server)
    m = args.messages
    print(f"{m} messages of {size / 1e6:.2f} MB (64 flowers inline), received+acked, median of {args.rounds}")
    print(f"{'':8s} {'worker CPU ms/msg':>18s} {'Redis CPU ms/msg':>17s} {'MB up to Redis/msg':>19s}")
    for name, rows in results.items():
        cpu = statistics.median(1000 * c / m for c, _, _ in rows)
        rcpu = statistics.median(1000 * c / m for _, c, _ in rows)
        up = statistics.median(u / m / 1e6 for _, _, u in rows)
        print(f"{name:8s} {cpu:18.2f} {rcpu:17.2f} {up:19.3f}")
    for name, rows in results.items():
        print(f"  {name} rounds, worker ms/msg: {[round(1000 * c / m, 2) for c, _, _ in rows]}")


if __name__ == "__main__":
    main()
