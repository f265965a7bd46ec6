"""int8 collections: conversion from the collection's own network, parity with float, no mixing."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from pupyl_queue import priority
from pupyl_queue.images import decode
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelMismatchError
from pupyl_queue.queries import search
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.conftest import PHOTOS
from tests.imagegen import encode, pattern
from tests.indexing import index_folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    if PHOTOS.exists():
        shutil.copytree(PHOTOS / "caer", folder)
        shutil.copytree(PHOTOS / "coral" / "imprinting", folder / "imprinting")
    else:
        folder.mkdir()
        for seed in range(16):
            (folder / f"{seed}.png").write_bytes(encode(pattern(seed), "PNG"))
    return folder


def index(rt: Runtime, folder: Path, model: Path, collection: str, precision: str, job_id: str) -> None:
    index_folder(rt, folder, model, collection, precision=precision, job_id=job_id)


def test_int8_collection_matches_float(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path, photos: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=8))
    index(rt, photos, tiny_model, "floaty", "float32", "jf")
    index(rt, photos, tiny_model, "quant", "int8", "jq")
    layout = Layout("quant")
    assert rt.store.children(layout.calibration)  # the first job's images calibrate the model
    assert len(list(rt.store.list(f"{layout.root}/int8/"))) == 1  # converted once, cached in the store
    float_x, int8_x = rt.extractor("floaty"), rt.extractor("quant")
    assert int8_x.spec.precision == "int8" and float_x.spec.precision == "float32"
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    pixels = np.stack([decode(f.read_bytes(), 10**8, target=224).pixels(224) for f in files])
    cosine = np.sum(float_x.embed(pixels) * int8_x.embed(pixels), axis=1)
    assert np.median(cosine) > 0.9, cosine  # same network, quantized
    _check_network_threads_lowered(rt, float_x, int8_x)
    # A query is embedded with the collection's precision: each photo finds itself first.
    for f in files[:4]:
        answer = search(
            rt, {"collection": "quant", "query": {"image_b64": _b64(f)}, "top": 1, "metadata": True}
        )
        assert answer["results"][0]["metadata"]["original_file_name"] == f.name
        assert answer["results"][0]["distance"] < 1e-4


def test_precision_cannot_be_mixed(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path, photos: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))
    index(rt, photos, tiny_model, "mixed", "float32", "j1")
    with pytest.raises(ModelMismatchError, match=r"\(float32\).*asks for .*\(int8\)"):
        index(rt, photos, tiny_model, "mixed", "int8", "j2")


def _check_network_threads_lowered(rt: Runtime, float_x: object, int8_x: object) -> None:
    """On CPU the embed stage lowers the network's threads (PUPYL_NETWORK_NICE, 10): LiteRT's
    interpreter threads and TensorFlow's native pools; this process's own threads (the caller,
    the runtime's fetch and store-write pool) stay at 0."""
    if not priority.LINUX:
        return
    rt.lower_network_threads(float_x)  # type: ignore[arg-type]
    litert, native = int8_x.compute_threads(), float_x.compute_threads()  # type: ignore[attr-defined]
    assert len(litert) >= 1 and len(native) >= 1
    assert {priority.niceness(t) for t in litert + native} <= {10, None}  # None: a thread since gone
    # Other tests' int8 pools in this process were lowered by their own runtimes: not counted.
    ours = {
        t.native_id: t.name
        for t in threading.enumerate()
        if not t.name.startswith("pupyl-litert") and not isinstance(t, threading._DummyThread)
    }
    assert threading.get_native_id() in ours
    assert any(name.startswith("pupyl-decode") for name in ours.values())  # the runtime's pool
    lowered = {tid: name for tid, name in ours.items() if priority.niceness(tid) not in (0, None)}
    assert not lowered, lowered


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()
