"""What one big task message costs its producer, Redis and the worker that receives it, three ways.

    python bench/landed_delivery.py [--messages 100] [--rounds 5]

An embed batch of 64 small images carried inline is one ~1 MB message. On receipt, kombu
records the delivery by JSON-encoding the whole message again and sending it back to Redis
(``unacked``), and the landing list's entry was removed by value (LREM: the message once
more). Since session 12 both are Lua calls on the copy Redis already holds
(``broker_fixes._RECORD_LANDED``, ``_UNLAND``); and the task's JSON goes into the envelope as
text instead of base64 of it (``body_encoding`` utf-8, celery_app.py). Variants:
"kombu" (base64 body, those two calls refused: exactly kombu's way, the fallback the code
keeps), "landed" (base64 body, the Lua calls) and "landed+text" (today). One process, one
redis-server, real kombu transport; the messages are real embed payloads: 64 of the 128 px
flowers each, inline (base64), as the ingest worker sends them.
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
    variants = ("kombu", "landed", "landed+text")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis(Path(tmp), port, appendonly=False)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            app = make_app(Settings(redis_url=url), include_tasks=False)  # the worker's: body as text
            base64_app = make_app(Settings(redis_url=url), include_tasks=False)
            base64_app.conf.broker_transport_options = {
                **base64_app.conf.broker_transport_options,
                "body_encoding": "base64",
            }
            r = redis.Redis.from_url(url)
            broker_fixes.land_as("bench@host")
            sizes: dict[str, int] = {}
            send: dict[str, list[float]] = {v: [] for v in variants}
            results: dict[str, list[tuple[float, float, int]]] = {v: [] for v in variants}
            for n in range(args.rounds):
                for name in variants if n % 2 == 0 else variants[::-1]:
                    producer = app if name == "landed+text" else base64_app
                    started = time.process_time()
                    for _ in range(args.messages):
                        producer.send_task("pupyl.embed", kwargs=kwargs, queue=QUEUE)
                    send[name].append(time.process_time() - started)
                    sizes[name] = len(r.lindex(QUEUE, 0) or b"")
                    broker_fixes.record_landed, broker_fixes.unland_head = (
                        refused if name == "kombu" else real
                    )
                    results[name].append(receive(app, r, args.messages))
            broker_fixes.record_landed, broker_fixes.unland_head = real
        finally:
            stop(server)
    m = args.messages
    print(f"{m} messages of 64 flowers inline, published, received and acked; median of {args.rounds} rounds")
    head = ("MB/message", "producer CPU ms", "worker CPU ms", "Redis CPU ms", "MB up (receipt)")
    print(f"{'':12s}" + "".join(f"{h:>17s}" for h in head) + "   (per message)")
    for name in variants:
        rows = results[name]
        cells = (
            sizes[name] / 1e6,
            statistics.median(1000 * c / m for c in send[name]),
            statistics.median(1000 * c / m for c, _, _ in rows),
            statistics.median(1000 * c / m for _, c, _ in rows),
            statistics.median(u / m / 1e6 for _, _, u in rows),
        )
        print(f"{name:12s}" + "".join(f"{c:17.3f}" for c in cells))
    for name in variants:
        print(f"  {name} rounds, worker ms/msg: {[round(1000 * c / m, 2) for c, _, _ in results[name]]}")


if __name__ == "__main__":
    main()
