"""Ingestion throughput: model-only limit, pupyl-queue end to end through Celery, and pupyl 0.14.7.

One script, one machine, the same photos and the same weights everywhere; each
figure is the median of --runs runs. Usage (see BENCHMARKS.md for the numbers):

    .venv/bin/python bench/ingest.py --images 1000 --runs 3 --pupyl-python /tmp/pupylvenv/bin/python
    .venv/bin/python bench/ingest.py --images 24 --runs 1 --characteristics 1   # smoke run (CI)
    .venv/bin/python bench/ingest.py --model null --images 1000 --runs 3    # the system without a network

``--model null`` indexes into a collection whose extractor costs nothing (a fixed
vector per image, models.NullExtractor): what the system moves when the network
is free, as on a GPU, next to the decode ceiling of this machine's cores
(decode + resize of the same photos in one process per core), in the same run.

The weights are random (speed does not depend on their values), written in the
legacy HDF5 format under the file name Keras caches, so pupyl finds them in
$KERAS_HOME/models and pupyl-queue loads them through PUPYL_WEIGHTS: no download.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from pupyl_queue.characteristics import Characteristic  # noqa: E402
from pupyl_queue.settings import Settings  # noqa: E402

SETTINGS: dict[str, Any] = {}  # the workers' settings beyond the defaults (--batch-size, --infer-batch)
OPTIONS: dict[str, int] = {"warmup": 0, "search": 0}  # --warmup, --search

PUPYL_SCRIPT = """
import sys, time
from pupyl.search import PupylImageSearch
search = PupylImageSearch(data_dir=sys.argv[2], characteristic=int(sys.argv[3]))
started = time.perf_counter()
search.index(sys.argv[1])
print(time.perf_counter() - started)
"""


def photo_set(count: int, folder: Path) -> list[Path]:
    """``count`` real photos: the flowers set round-robin over classes, then ../shared/data/photos."""
    sources: list[Path] = []
    flowers = SHARED / "flowers"
    if flowers.exists():
        classes = [sorted(d.glob("*.jpg")) for d in sorted(flowers.iterdir()) if d.is_dir()]
        for row in range(max(len(c) for c in classes)):
            sources.extend(c[row] for c in classes if row < len(c))
    photos = SHARED / "photos"
    if photos.exists():
        sources = (
            sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".bmp", ".png")) + sources
        )
    if len(sources) < count:
        raise SystemExit(f"only {len(sources)} photos under {SHARED}; ask for fewer with --images")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, src in enumerate(sources[:count]):
        dest = folder / f"{n:05d}{src.suffix.lower()}"
        shutil.copy(src, dest)
        out.append(dest)
    return out


def write_weights(characteristic: Characteristic, keras_home: Path) -> Path:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from pupyl_queue.models import build_characteristic

    folder = keras_home / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / characteristic.network.weights_file
    if not path.exists():
        model = build_characteristic(characteristic, None)._model
        with h5py.File(path, "w") as fh:
            legacy_h5_format.save_weights_to_hdf5_group(fh, model)
    return folder


class ModelOnly:
    """The forward pass alone on pre-decoded batches (the limit): built once, timed as often as asked."""

    def __init__(
        self, characteristic: Characteristic, weights: Path, files: list[Path], batch: int, precision: str
    ) -> None:
        import numpy as np

        from pupyl_queue.images import decode
        from pupyl_queue.int8 import CALIBRATION_IMAGES, Int8Extractor, convert
        from pupyl_queue.models import build_characteristic, configure_backend, resolve_weights

        configure_backend(0, False)
        extractor: Any = build_characteristic(characteristic, resolve_weights(characteristic, str(weights)))
        size = extractor.input_size
        self.pixels = np.stack([decode(f.read_bytes(), 10**9, target=size).pixels(size) for f in files])
        if precision == "int8":
            tflite = convert(extractor, self.pixels[:CALIBRATION_IMAGES])
            extractor = Int8Extractor(extractor.spec.with_precision("int8"), tflite, extractor.preprocess)
        self.extractor, self.batch = extractor, batch
        extractor.embed(self.pixels[:batch])  # warm-up: trace and compile

    def once(self) -> tuple[float, float]:
        """Images/s of one pass, and its CPU ms per image (every thread of this process: what the
        network takes from the cores the decode shares)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(self.pixels), self.batch):
            self.extractor.embed(self.pixels[start : start + self.batch])
        elapsed = time.perf_counter() - started
        return len(self.pixels) / elapsed, (time.process_time() - cpu_started) * 1000 / len(self.pixels)


def model_only(
    characteristic: Characteristic, weights: Path, files: list[Path], runs: int, batch: int, precision: str
) -> tuple[float, float]:
    """The median of ``runs`` passes of ModelOnly: img/s and CPU ms per image."""
    network = ModelOnly(characteristic, weights, files, batch, precision)
    passes = [network.once() for _ in range(runs)]
    return statistics.median(p[0] for p in passes), statistics.median(p[1] for p in passes)


class PeakRSS:
    """Samples a process's resident memory; /proc's VmHWM misses nothing between samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def peak_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


class CpuSeconds:
    """CPU seconds (user + system) spent by each part of the running system, read from /proc.

    Why: on two cores every part competes for the same CPU, so per-image CPU says where the end to
    end rate goes; on a GPU host the embed worker's own process (the one that feeds the network)
    is one core that every image passes through, so its CPU per image bounds the rate it can feed.
    """

    def __init__(self, ingest: int, embed: int, redis: int) -> None:
        import psutil

        self._psutil = psutil
        self.roles = {"cpu_ingest_s": [ingest], "cpu_feeding_s": [embed], "cpu_redis_s": [redis]}
        self.embed = embed

    def _decoders(self) -> list[int]:
        """The embed worker's decode processes (and the pool's resource tracker)."""
        try:
            return [p.pid for p in self._psutil.Process(self.embed).children(recursive=True)]
        except self._psutil.Error:
            return []

    def read(self) -> dict[str, float]:
        out = {}
        for role, pids in {**self.roles, "cpu_decode_s": self._decoders()}.items():
            total = 0.0
            for pid in pids:
                try:
                    times = self._psutil.Process(pid).cpu_times()
                except self._psutil.Error:
                    continue
                total += times.user + times.system
            out[role] = total
        return out


def end_to_end(
    characteristic: Characteristic,
    weights: Path,
    folder: Path,
    count: int,
    runs: int,
    work: Path,
    precision: str,
    spec: Any = None,
    before_run: Callable[[], object] | None = None,
) -> tuple[float, float, list[dict[str, float]]]:
    """Images/s from index() to job done through real Redis, ingest and embed workers; peak embed RSS.

    ``spec`` (a ModelSpec) creates the collection with that model first (the null extractor).
    Also gives, per timed run, its seconds and where the embed worker spent them.
    ``before_run`` runs before each timed run, the workers idle (--paired: a model-only pass).
    """
    from pupyl_queue import PupylQueue
    from pupyl_queue.stack import free_port, start_redis, start_worker, stop

    port = free_port()
    tag = f"{characteristic.value}-{precision}" if spec is None else spec.kind
    redis = start_redis(work / f"redis-{tag}", port, appendonly=False)
    settings = Settings(
        **SETTINGS,
        data_dir=work / f"data-{tag}",
        redis_url=f"redis://127.0.0.1:{port}/0",
        weights=str(weights),
        characteristic=characteristic,
    )
    ingest = start_worker("ingest", settings, log_path=work / "ingest.log")
    embed = start_worker("embed", settings, log_path=work / "embed.log")
    try:
        # A first job builds the model (and, for int8, calibrates and converts it on these photos);
        # the timed jobs index the same photos again into the same collection.
        client = PupylQueue(settings=settings, collection=f"c{tag}", precision=precision)
        if spec is not None:
            create_collection(client, spec)
        started = time.perf_counter()
        client.index(warmup_folder(folder, work, OPTIONS["warmup"])).wait(timeout=3600)
        print(
            f"  {tag}: first job (model build{', int8 conversion' if precision == 'int8' else ''}) "
            f"{time.perf_counter() - started:.1f}s"
        )
        rates, spent_runs = [], []
        cpu = CpuSeconds(ingest.pid, embed.pid, redis.pid)
        for run in range(runs):
            if before_run is not None:
                before_run()
            cpu_before = cpu.read()
            started = time.perf_counter()
            job = client.index(folder)
            state = job.wait(timeout=3600, poll=0.05)
            elapsed = time.perf_counter() - started
            cpu_spent = {k: v - cpu_before.get(k, 0.0) for k, v in cpu.read().items()}
            assert state["indexed"] == count, state
            rates.append(count / elapsed)
            spent = _stage_seconds(client, job.id, int(state["batches_total"]))
            spent_runs.append({"elapsed_s": elapsed, **spent, **cpu_spent})
            print(
                f"  run {run}: {elapsed:.2f}s; embed worker: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in spent.items())
            )
        peak = PeakRSS(embed.pid).peak_mib()
        if OPTIONS["search"]:
            search_latency(client, settings, sorted(folder.iterdir()), OPTIONS["search"], work)
        return statistics.median(rates), peak, spent_runs
    finally:
        for proc in (ingest, embed, redis):
            stop(proc)


def link(source: Path, name: Path) -> None:
    """``name`` for ``source``'s bytes: a hard link, or a symbolic one across file systems."""
    try:
        os.link(source, name)
    except OSError:
        name.symlink_to(source.resolve())


def warmup_folder(folder: Path, work: Path, count: int) -> Path:
    """The first job's folder: all of ``folder``, or its first ``count`` files (hard links, same bytes).

    The first job only builds the model; on 50,000 photos it would double the run for nothing.
    """
    if not count:
        return folder
    small = work / "warmup"
    if not small.exists():
        small.mkdir(parents=True)
        for path in sorted(folder.iterdir())[:count]:
            link(path, small / path.name)
    return small


def search_latency(client: Any, settings: Settings, files: list[Path], queries: int, work: Path) -> None:
    """Searches of the collection just indexed, through a search worker: by image and by stored id.

    By image, the search worker embeds the query (its own model) and looks it up; by id, the
    index alone answers. Each photo is indexed, so its own image must come back first at ~0.
    """
    from pupyl_queue.stack import start_worker, stop

    search = start_worker("search", settings, log_path=work / "search.log")
    try:
        sample = files[:: max(1, len(files) // queries)][:queries]
        started = time.perf_counter()
        client.search(str(sample[0]), top=10, timeout=900)  # builds the model, loads the index
        print(f"  search worker: first answer (model build, index load) {time.perf_counter() - started:.1f}s")
        by_image, by_id, ids, self_hits, worst = [], [], [], 0, 0.0
        for path in sample:
            started = time.perf_counter()
            rows = client.search(str(path), top=10, return_distances=True, timeout=60)
            by_image.append(time.perf_counter() - started)
            ids.append(rows[0][0])
            self_hits += rows[0][1] < 1e-3
            worst = max(worst, rows[0][1])
        for image_id in ids:
            started = time.perf_counter()
            client.search(int(image_id), top=10, timeout=60)
            by_id.append(time.perf_counter() - started)
    finally:
        stop(search)
    log = (work / "search.log").read_text(errors="replace")
    where = "CPU (faiss said why in the search log)" if "stays on the CPU" in log else "wherever faiss put it"
    try:
        import faiss

        where = f"{where}; faiss {faiss.__version__} sees {faiss.get_num_gpus()} GPU(s)"
    except ImportError:
        where = f"{where}; no faiss in this process"
    print(f"  searches, top 10, one at a time through Celery ({len(sample)} each); index: {where}")
    for name, seconds in (("by image", by_image), ("by stored id", by_id)):
        seconds = sorted(seconds)
        print(
            f"    {name:<13} p50 {seconds[len(seconds) // 2] * 1000:7.1f} ms  "
            f"p95 {seconds[int(len(seconds) * 0.95)] * 1000:7.1f} ms"
        )
    print(f"    top hit at distance < 1e-3 (the query itself): {self_hits}/{len(sample)}", end="; ")
    print(f"largest top-hit distance {worst:.2e}")


def create_collection(client: Any, spec: Any) -> None:
    """Write a manifest and model claim as ensure_collection does, for a spec no request can name."""
    from pupyl_queue import constants as C
    from pupyl_queue.layout import Layout

    layout = Layout(client.collection)
    client.redis.set(layout.key("model"), json.dumps(spec.to_json(), sort_keys=True))
    manifest = {"schema": C.SCHEMA_VERSION, "collection": layout.collection, "model": spec.to_json()}
    client.store.put(layout.manifest, json.dumps({**manifest, "created_at": time.time()}).encode())


def _decode_one(path: str, size: int = 224) -> int:
    """What an embed worker does to one photo before the network: read, hash, decode, squash to size."""
    from pupyl_queue.images import decode

    image = decode(Path(path).read_bytes(), 64_000_000, target=size)
    image.pixels(size)
    return len(image.normalized_bytes())


def print_pairs(limit_name: str, limits: list[float], rates: list[float]) -> None:
    """Each pair (the limit measured right before an end-to-end run) and the median of their ratios."""
    ratios = [rate / limit for limit, rate in zip(limits, rates, strict=True)]
    for n, (limit, rate, ratio) in enumerate(zip(limits, rates, ratios, strict=True)):
        print(f"  pair {n}: {limit_name} {limit:.1f} img/s, end to end {rate:.1f} img/s: {ratio:.0%}")
    print(f"  median of the {len(ratios)} pairs' ratios: {statistics.median(ratios):.0%}")


class DecodeCeiling:
    """Decode + resize in one process per core, the processes started once: timed as often as asked."""

    def __init__(self, files: list[Path], size: int = 224) -> None:
        """``size``: the network's input size (480 for EfficientNetV2: a larger squash, a smaller draft)."""
        import functools
        import multiprocessing

        self.paths = [str(f) for f in files]
        self.cores = os.cpu_count() or 1
        self.decode = functools.partial(_decode_one, size=size)
        self.pool = multiprocessing.get_context("spawn").Pool(self.cores)
        self.pool.map(self.decode, self.paths[: self.cores * 4])  # start and warm every process

    def one_core(self) -> float:
        """Images/s in this process: on at most 1,000 photos (50,000 would take minutes)."""
        started = time.perf_counter()
        for path in self.paths[:1000]:
            self.decode(path)
        return len(self.paths[:1000]) / (time.perf_counter() - started)

    def once(self) -> float:
        """Images/s of one pass over every photo on all cores (the ceiling)."""
        started = time.perf_counter()
        self.pool.map(self.decode, self.paths, chunksize=16)
        return len(self.paths) / (time.perf_counter() - started)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def decode_rates(files: list[Path], runs: int, size: int = 224) -> tuple[float, float]:
    """Images/s of decode + resize on one core, and in one process per core (the ceiling)."""
    ceiling = DecodeCeiling(files, size)
    try:
        single = [ceiling.one_core() for _ in range(runs)]
        return statistics.median(single), statistics.median(ceiling.once() for _ in range(runs))
    finally:
        ceiling.close()


def null_model(files: list[Path], folder: Path, runs: int, work: Path, paired: bool = False) -> None:
    """The whole system with a network that costs nothing, next to this machine's decode ceiling.

    ``paired``: a ceiling pass right before each end-to-end run (the workers idle), each run
    compared with the ceiling measured next to it, as this machine's speed moves within minutes."""
    from pupyl_queue.models import ModelSpec

    pool = DecodeCeiling(files)
    try:
        one_core = statistics.median(pool.one_core() for _ in range(runs))
        ceilings: list[float] = []
        if not paired:
            ceilings = [pool.once() for _ in range(runs)]
        c = Characteristic(1)
        e2e, peak, spent = end_to_end(
            c,
            Path(""),
            folder,
            len(files),
            runs,
            work,
            "float32",
            ModelSpec.null(),
            before_run=(lambda: ceilings.append(pool.once())) if paired else None,
        )
    finally:
        pool.close()
    ceiling = statistics.median(ceilings)
    cores = pool.cores
    print(
        f"\n{len(files)} photos, median of {runs} runs, {platform.processor() or platform.machine()}, "
        f"{cores} cores, {time.strftime('%Y-%m-%d')}, null extractor (1024-d fixed vectors)"
    )
    if paired:
        print_pairs("ceiling", ceilings, [len(files) / run["elapsed_s"] for run in spent])
    print(f"{'what':<44} {'img/s':>9} {'of ceiling':>11}")
    print(f"{'decode + resize, 1 process':<44} {one_core:>9.1f} {one_core / ceiling:>10.0%}")
    print(f"{f'decode + resize, {cores} processes (the ceiling)':<44} {ceiling:>9.1f} {1:>10.0%}")
    print(f"{'end to end, null extractor':<44} {e2e:>9.1f} {e2e / ceiling:>10.0%}")
    print(f"embed worker peak RSS {peak:.0f} MiB")
    print("per 1,000 images (median run), seconds (cpu_*: CPU seconds of that part, so ms per image):")
    middle = sorted(spent, key=lambda r: r["elapsed_s"])[len(spent) // 2]
    per = 1000 / len(files)
    for key, value in middle.items():
        print(f"  {key:<14} {value * per:>7.2f}")


def _stage_seconds(client: object, job_id: str, batches: int) -> dict[str, float]:
    """Where the embed worker's time went, summed over the job's batch reports."""
    from pupyl_queue.layout import Layout

    totals = {"wait_s": 0.0, "infer_s": 0.0, "write_s": 0.0}
    for batch in range(batches):
        report = json.loads(client.store.get(Layout(client.collection).job_report(job_id, batch)))  # type: ignore[attr-defined]
        for key in totals:
            totals[key] += report.get(key, 0.0)
    return totals


def pupyl_rate(
    python: str, characteristic: Characteristic, folder: Path, count: int, runs: int, work: Path
) -> float:
    rates = []
    for run in range(runs):
        data_dir = work / f"pupyl-{characteristic.value}-{run}"
        out = subprocess.run(
            [python, "-c", PUPYL_SCRIPT, str(folder), str(data_dir), str(characteristic.value)],
            capture_output=True,
            text=True,
            check=False,
            env=os.environ.copy(),
        )
        if out.returncode != 0:
            raise SystemExit(f"pupyl failed:\n{out.stderr[-3000:]}")
        rates.append(count / float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(rates)


def paired(
    c: Characteristic,
    weights: Path,
    subset: list[Path],
    folder: Path,
    count: int,
    args: argparse.Namespace,
    work: Path,
    precision: str,
) -> tuple[float, float, float, float]:
    """A model-only pass right before each end-to-end run, the workers idle: this machine's speed
    moves by up to a fifth within minutes (BENCHMARKS.md, session 15), so each run is compared with
    the limit measured next to it. Model-only img/s, its CPU ms/img, end to end img/s (the medians)
    and peak RSS; prints each pair and the median of their ratios."""
    network = ModelOnly(c, weights, subset, args.batch, precision)
    limits: list[tuple[float, float]] = []
    measure = lambda: limits.append(network.once())  # noqa: E731
    _, peak, runs = end_to_end(c, weights, folder, count, args.runs, work, precision, before_run=measure)
    rates = [count / run["elapsed_s"] for run in runs]
    print_pairs("model-only", [limit for limit, _ in limits], rates)
    return (
        statistics.median(limit for limit, _ in limits),
        statistics.median(cpu for _, cpu in limits),
        statistics.median(rates),
        peak,
    )


def _chosen_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields the command line sets for the run's workers."""
    chosen: dict[str, Any] = {
        k: v
        for k, v in (
            ("batch_size", args.batch_size),
            ("infer_batch", args.infer_batch),
            ("embed_concurrency", args.embed_concurrency),
        )
        if v
    }
    if args.local_references:
        chosen["local_references"] = True
    if args.mixed_precision:
        chosen["mixed_precision"] = True
    # 0 is a value for these: decode in the embed worker's threads; the network at the feeding's priority
    for name in ("decode_processes", "network_nice"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    return chosen


def report(
    rows: list[dict[str, Any]], ceilings: dict[int, tuple[float, float]], count: int, runs: int
) -> None:
    """The table of a run, then each network against its decode ceiling and the most the cores allow."""
    print(
        f"\n{count} photos, median of {runs} runs, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'characteristic':<32} {'model-only img/s':>17} {'end-to-end img/s':>17} {'e2e/limit':>10} "
        f"{'pupyl 0.14.7 img/s':>19} {'e2e/pupyl':>10} {'embed peak RSS':>15}"
    )
    for r in rows:
        pupyl = f"{r['pupyl']:.1f}" if r["pupyl"] else "-"
        ratio = f"{r['end_to_end'] / r['pupyl']:.1f}x" if r["pupyl"] else "-"
        print(
            f"{r['characteristic']:<32} {r['model_only']:>17.1f} {r['end_to_end']:>17.1f} "
            f"{r['end_to_end'] / r['model_only']:>9.0%} {pupyl:>19} {ratio:>10} "
            f"{r['embed_peak_rss_mib']:>11.0f} MiB"
        )
    for size, ceiling in ceilings.items():
        rates = f"{ceiling[0]:.1f} img/s in 1 process, {ceiling[1]:.1f} in {os.cpu_count()}"
        print(f"decode + resize to {size}: {rates}")
        for r in [r for r in rows if r["input_size"] == size]:
            r["decode_ceiling"] = ceiling[1]
            share = r["end_to_end"] / min(r["model_only"], ceiling[1])
            print(f"{r['characteristic']}: end to end / min(model-only, decode ceiling) {share:.0%}")
            # The network and the decode share the cores: even a pipeline costing nothing else reaches
            # at most cores / (network CPU + decode CPU) per image.
            decode_ms = 1000 / ceiling[0]
            bound = (os.cpu_count() or 1) * 1000 / (r["model_cpu_ms"] + decode_ms)
            r["bound"] = min(bound, r["model_only"])
            print(
                f"{r['characteristic']}: network {r['model_cpu_ms']:.2f} + decode {decode_ms:.2f} CPU ms/img "
                f"on {os.cpu_count()} cores: at most {r['bound']:.1f} img/s end to end, "
                f"{r['bound'] / r['model_only']:.0%} of model-only "
                f"(measured: {r['end_to_end'] / r['model_only']:.0%})"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--characteristics", default="1,2")
    parser.add_argument("--model", choices=("keras", "null"), default="keras", help="null: no network")
    parser.add_argument("--precisions", default="float32", help="float32, int8 or both: float32,int8")
    parser.add_argument("--batch", type=int, default=32, help="forward-pass batch of the model-only figure")
    parser.add_argument("--pupyl-python", default="", help="python of a venv with pupyl==0.14.7")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--photos", default="", help="a folder of photos to use instead of ../shared/data")
    parser.add_argument("--model-images", type=int, default=1000, help="photos the model-only figure runs on")
    parser.add_argument("--batch-size", type=int, default=0, help="PUPYL_BATCH_SIZE of the run (images/task)")
    parser.add_argument("--infer-batch", type=int, default=0, help="PUPYL_INFER_BATCH of the run")
    parser.add_argument(
        "--decode-processes", type=int, default=None, help="PUPYL_DECODE_PROCESSES of the run"
    )
    parser.add_argument("--embed-concurrency", type=int, default=0, help="PUPYL_EMBED_CONCURRENCY of the run")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="a model-only (null: decode ceiling) pass before each end-to-end run",
    )
    parser.add_argument("--network-nice", type=int, default=None, help="PUPYL_NETWORK_NICE of the run")
    parser.add_argument(
        "--local-references", action="store_true", help="PUPYL_LOCAL_REFERENCES: files as paths, not staged"
    )
    parser.add_argument("--ceiling", action="store_true", help="also measure the decode ceiling (all cores)")
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="PUPYL_MIXED_PRECISION: float16 on a GPU, model-only too",
    )
    parser.add_argument("--warmup", type=int, default=0, help="the untimed first job's photos (0: all)")
    parser.add_argument("--search", type=int, default=0, help="then this many searches by image and by id")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    OPTIONS.update(warmup=args.warmup, search=args.search)

    work = Path(tempfile.mkdtemp(prefix="pupyl-bench-"))
    os.environ["KERAS_HOME"] = str(work / "keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pupyl_queue.models import configure_backend

    # as an embed worker does, before any network is built (float16 only where there is a GPU)
    device = configure_backend(0, args.mixed_precision)
    print(f"Keras backend {device['backend']}, {device['gpus']} GPU(s), mixed {device['mixed_precision']}")
    SETTINGS.update(_chosen_settings(args))

    def label(precision: str) -> str:
        return "mixed float16" if precision == "float32" and device["mixed_precision"] else precision

    if args.photos:  # e.g. bench/gpu's 50,000 generated photos
        folder = Path(args.photos)
        every = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(every) < args.images:
            raise SystemExit(f"{folder} holds {len(every)} photos; ask for fewer with --images")
        if len(every) > args.images or len(every) < len(list(folder.iterdir())):
            folder = work / "photos"  # the jobs index a folder: one holding these photos alone
            folder.mkdir()
            for path in every[: args.images]:
                link(path, folder / path.name)
        files = sorted(folder.iterdir())
    else:
        folder = work / "photos"
        files = photo_set(args.images, folder)
    if args.model == "null":
        null_model(files, folder, args.runs, work, args.paired)
        shutil.rmtree(work, ignore_errors=True)
        return
    ceilings: dict[int, tuple[float, float]] = {}  # per input size: the decode work depends on it
    rows = []
    for value, precision in itertools.product(args.characteristics.split(","), args.precisions.split(",")):
        c = Characteristic.parse(value)
        size = c.network.input_size
        if args.ceiling and size not in ceilings:
            ceilings[size] = decode_rates(files, args.runs, size)
        weights = write_weights(c, work / "keras")
        subset = files[: args.model_images]
        if args.paired:
            limit, model_cpu, e2e, peak = paired(
                c, weights, subset, folder, len(files), args, work, precision
            )
        else:
            limit, model_cpu = model_only(c, weights, subset, args.runs, args.batch, precision)
            e2e, peak, _ = end_to_end(c, weights, folder, len(files), args.runs, work, precision)
        pupyl = None
        if args.pupyl_python and c.value == 1 and precision == "float32":  # Keras checks other files' hashes
            pupyl = pupyl_rate(args.pupyl_python, c, folder, len(files), args.runs, work)
        rows.append(
            {
                "characteristic": f"{c.value} {c.network.application} {label(precision)}",
                "input_size": size,
                "model_only": limit,
                "model_cpu_ms": model_cpu,
                "end_to_end": e2e,
                "pupyl": pupyl,
                "embed_peak_rss_mib": peak,
            }
        )
    report(rows, ceilings, len(files), args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
