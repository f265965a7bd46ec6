"""The benchmarks run end to end on a handful of inputs (their figures live in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA, need_shared

pytestmark = pytest.mark.slow


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ingest_benchmark_smoke() -> None:
    need_shared(SHARED_DATA / "photos")
    table = run(
        "bench/ingest.py",
        "--images",
        "12",
        "--runs",
        "1",
        "--characteristics",
        "1",
        "--precisions",
        "float32,int8",
        "--ceiling",
        "--paired",
    )
    # --paired: a model-only pass next to each end-to-end run, each pair's ratio printed
    pairs = [line for line in table.splitlines() if line.strip().startswith("pair 0: model-only")]
    assert len(pairs) == 2 and all(float(p.split("end to end ")[1].split()[0]) > 0 for p in pairs), table
    lines = [line for line in table.splitlines() if line.startswith("1 MobileNet")]
    rows = [line for line in lines if ":" not in line]
    assert len(rows) == 2 and "float32" in rows[0] and "int8" in rows[1]
    rates = [float(row.split()[3]) for row in rows]  # model-only img/s
    assert all(rate > 0 for rate in rates)
    # The bound of a pipeline that shares the cores between network and decode: below model-only.
    bounds = [line for line in lines if "CPU ms/img" in line]
    assert len(bounds) == 2
    for line in bounds:
        share = int(line.split("img/s end to end, ")[1].split("%")[0])
        assert 0 < share <= 100, line


def test_index_benchmark_smoke() -> None:
    need_shared(ROOT.parent / "shared" / "bench" / "vectors.py")
    table = run(
        "bench/index_scale.py",
        "--sizes",
        "3000",
        "--dim",
        "64",
        "--queries",
        "20",
        "--e2e-queries",
        "5",
        "--nprobe-sweep",
        "8",
    )
    row = next(line for line in table.splitlines() if line.strip().startswith("3000"))
    recall = float(row.split()[-2])
    assert 0.5 <= recall <= 1.0


def test_index_codes_benchmark_smoke() -> None:
    need_shared(ROOT.parent / "shared" / "bench" / "vectors.py")
    args = [
        "--n",
        "3000",
        "--dim",
        "64",
        "--nlist",
        "16",
        "--nprobe",
        "4",
        "--codes",
        "SQ8,SQ4,PQ8,PQ8+RefineSQ8",
    ]
    table = run("bench/index_codes.py", *args)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[-4:]}
    assert set(rows) == {"SQ8", "SQ4", "PQ8", "PQ8+RefineSQ8"}
    assert [int(rows[c][1]) for c in ("SQ8", "SQ4", "PQ8")] == [64, 32, 8]  # bytes per vector
    assert float(rows["SQ8"][3]) >= float(rows["PQ8"][3])  # finer codes, no worse recall


def test_load_benchmark_smoke() -> None:
    need_shared(SHARED_DATA / "photos")
    table = run(
        "bench/load.py",
        "--seed",
        "30",
        "--producers",
        "2",
        "--jobs",
        "1",
        "--per-job",
        "15",
        "--searches",
        "20",
    )
    phases = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"idle", "under ingest", "embed", "search"} <= set(phases)
    p50 = float(phases["under ingest"].split("|")[3])
    assert p50 > 0


def test_null_model_benchmark_smoke() -> None:
    """The CPU proxy of a GPU worker: the whole stack with a free network, beside the decode ceiling."""
    need_shared(SHARED_DATA / "photos")
    table = run("bench/ingest.py", "--model", "null", "--images", "16", "--runs", "1", "--paired")
    rows = [line for line in table.splitlines() if line.startswith(("decode + resize", "end to end"))]
    assert len(rows) == 3 and "(the ceiling)" in rows[1] and "null extractor" in rows[2]
    assert all(float(row[44:].split()[0]) > 0 for row in rows)  # img/s
    assert "pair 0: ceiling" in table and "median of the 1 pairs' ratios" in table  # --paired


def test_expand_files_benchmark_smoke() -> None:
    table = run("bench/expand_files.py", "--code", ".", "--files", "40", "--rounds", "1")
    (row,) = [line for line in table.splitlines() if line.startswith(".")]
    assert all(float(cell) > 0 for cell in row.split()[2:])  # CPU ms per file, by path and by bytes


def test_s3_copies_benchmark_smoke() -> None:
    """A stored copy's cost to a decode process: decode only, local store, S3 in line, S3 in threads."""
    need_shared(SHARED_DATA / "photos")
    table = run(
        "bench/s3_copies.py",
        "--photos",
        str(SHARED_DATA / "photos"),
        "--images",
        "8",
        "--group",
        "4",
        "--rounds",
        "1",
    )
    rows = [line for line in table.splitlines() if line.startswith(("| no copies", "| local", "| S3"))]
    assert len(rows) == 4 and all(float(row.split("|")[2]) > 0 for row in rows), table  # wall ms per image


def test_s3_ingest_benchmark_smoke() -> None:
    """Indexing an s3:// prefix and uploads through the real stack, S3 requests counted per image."""
    need_shared(SHARED_DATA / "photos")
    table = run(
        "bench/s3_ingest.py",
        "--photos",
        str(SHARED_DATA / "photos"),
        "--images",
        "6",
        "--rounds",
        "1",
        "--variants",
        "bytes,references,uploads",
    )
    rows = {
        line.split("|")[1].strip(): line
        for line in table.splitlines()
        if line.startswith("| ") and "img/s" not in line
    }
    assert set(rows) == {"PUPYL_S3_REFERENCES=false", "PUPYL_S3_REFERENCES=true", "uploads"}, table
    header = next(line for line in table.splitlines() if line.startswith("| run |")).split("|")
    requests = header.index(" requests ")
    # by name, two requests an image at the least (the source's GET, the stored copy's PUT)
    assert all(float(row.split("|")[requests]) >= 2.0 for row in rows.values()), table
