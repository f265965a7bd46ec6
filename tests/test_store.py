"""One suite, both stores: the local directory and S3 (a real moto_server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound, ObjectStore, S3Store, StoreUnavailable, open_store
from tests.conftest import s3_store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "file":
        yield open_store(Settings(data_dir=tmp_path))
    else:
        settings = Settings(
            **s3_store(
                request.getfixturevalue("s3_endpoint"), f"s3://bucket-{uuid.uuid4().hex[:8]}/some/prefix"
            ),
        )
        yield open_store(settings)


def test_put_get_exists_delete(store: ObjectStore) -> None:
    store.put("a/b/c.bin", b"\x00\x01payload")
    assert store.get("a/b/c.bin") == b"\x00\x01payload"
    assert store.exists("a/b/c.bin")
    store.put("a/b/c.bin", b"new")
    assert store.get("a/b/c.bin") == b"new"
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    store.delete("a/b/c.bin")  # deleting twice is fine


def test_delete_many(store: ObjectStore) -> None:
    keys = [f"many/{n}" for n in range(5)]
    for key in keys:
        store.put(key, b"x")
    store.put("many/kept", b"y")
    store.delete_many([*keys[:4], "many/never-there"])  # a missing object is no error
    assert list(store.list("many/")) == ["many/4", "many/kept"]
    store.delete_many([])
    store.delete_many(iter(keys))
    assert list(store.list("many/")) == ["many/kept"]


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("nope/never.json")
    assert not store.exists("nope/never.json")


def test_list_and_delete_prefix(store: ObjectStore) -> None:
    for key in ["x/2", "x/1", "x/sub/3", "y/1", "xx/1"]:
        store.put(key, key.encode())
    assert list(store.list("x/")) == ["x/1", "x/2", "x/sub/3"]
    assert list(store.list("missing/")) == []
    assert store.children("x") == ["1", "2", "sub"]
    assert store.children("") == ["x", "xx", "y"]
    assert store.children("missing") == []
    assert store.delete_prefix("x/") == 3
    assert sorted(store.list("")) == ["xx/1", "y/1"]


def test_large_object(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: multipart on S3
    store.put("big.bin", data)
    assert store.get("big.bin") == data


def test_files_stream_both_ways(store: ObjectStore, tmp_path: Path) -> None:
    """put_file/get_file carry snapshot indexes too big to hold twice in memory."""
    data = bytes(range(256)) * 50_000  # 12.8 MB: multipart on S3
    source = tmp_path / "index.faiss"
    source.write_bytes(data)
    store.put_file("snap/index.faiss", source)
    assert store.get("snap/index.faiss") == data
    out = tmp_path / "back.faiss"
    store.get_file("snap/index.faiss", out)
    assert out.read_bytes() == data
    with pytest.raises(ObjectNotFound):
        store.get_file("snap/missing.faiss", tmp_path / "missing.faiss")
    assert sorted(store.list("snap/")) == ["snap/index.faiss"]  # no temporary file left behind


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../up", "a//b", "a/./b", "a\\b"])
def test_keys_cannot_escape(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        store.put(key, b"x")


def test_s3_unreachable_is_transient_error() -> None:
    with pytest.raises(StoreUnavailable):
        S3Store("bucket", "", "127.0.0.1:9", "k", "s", secure=False)
