"""What listing a local folder costs the ingest worker, per file, for two checkouts side by side.

    python bench/expand_files.py --code /tmp/wt_before --code . [--files 5000] [--rounds 5]

An ingest expands a job's folders into items (the roots check, open, sniff, stat, metadata) before
any embed worker sees them; with ``PUPYL_LOCAL_REFERENCES`` that is nearly all its work, and on a
GPU host it runs for every one of the images the GPU is fed. Each ``--code`` is a checkout whose
``pupyl_queue`` a child process imports; the children run alternately, round by round, on one
folder of small JPEGs under an allowed root (``origin="network"``, as the API's jobs), by path
(references) and by bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pupyl_queue.settings import Settings
from pupyl_queue.sources import Sources
folder, out = sys.argv[2], {}
settings = Settings(data_dir=sys.argv[3], allowed_roots=str(sys.argv[4]))
for references in (True, False):
    sources = Sources(settings, origin="network", references=references)
    list(sources.expand(folder))  # warm: the page cache, the imports
    started = time.process_time()
    items = list(sources.expand(folder))
    assert items and not any(i.error for i in items), items[:3]
    out["references" if references else "bytes"] = (time.process_time() - started) * 1000 / len(items)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", action="append", required=True, help="a checkout (repeat to compare)")
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="pupyl-expand-") as tmp:
        folder = Path(tmp) / "root" / "photos"
        folder.mkdir(parents=True)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 120, 30)).save(buffer, "JPEG")
        for n in range(args.files):
            (folder / f"{n:06d}.jpg").write_bytes(buffer.getvalue())
        runs: dict[str, list[dict[str, float]]] = {code: [] for code in args.code}
        for _ in range(args.rounds):
            for code in args.code:
                root = str(Path(code).resolve())
                result = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        root,
                        str(folder),
                        str(Path(tmp) / "data"),
                        str(folder.parent),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[code].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{args.files} files listed, CPU ms per file, median of {args.rounds} alternating rounds")
    print(f"{'checkout':<40} {'commit':>8} {'by path (references)':>22} {'by bytes':>10}")
    for code, rows in runs.items():
        refs = statistics.median(r["references"] for r in rows)
        data = statistics.median(r["bytes"] for r in rows)
        head = subprocess.run(
            ["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        print(f"{code:<40} {head.stdout.strip() or '?':>8} {refs:>22.3f} {data:>10.3f}")


if __name__ == "__main__":
    main()
