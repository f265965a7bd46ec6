"""Collections side by side, delete, and backup/restore across store kinds (real Redis, S3, models)."""

from __future__ import annotations

import base64
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity
from pupyl_queue.backup import RestoreError, backup, restore
from pupyl_queue.catalog import CollectionMissing, delete_collection, describe_collection, list_collections
from pupyl_queue.layout import Layout
from pupyl_queue.models import wrap_mobilenet
from pupyl_queue.queries import compact, remove, search
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from tests.conftest import s3_store
from tests.imagegen import pattern_folder
from tests.indexing import index_folder


def folder_of(tmp_path: Path, name: str, seeds: range) -> Path:
    return pattern_folder(tmp_path / name, seeds, "PNG", f"{name}-{{seed}}")


def index(rt: Runtime, collection: str, folder: Path, model: Path) -> None:
    index_folder(rt, folder, model, collection)


def ask(rt: Runtime, collection: str, image: Path, top: int = 50) -> list[tuple[int, float, str]]:
    answer = search(
        rt,
        {
            "collection": collection,
            "top": top,
            "metadata": True,
            "query": {"image_b64": base64.b64encode(image.read_bytes()).decode()},
        },
    )
    return [
        (r["id"], round(r["distance"], 5), r["metadata"]["original_file_name"]) for r in answer["results"]
    ]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different network (MobileNet 0.5, random weights, 512-d)."""
    return wrap_mobilenet(None, tmp_path_factory.mktemp("other") / "mobilenet05.keras", alpha=0.5)


def s3_settings(endpoint: str, **changes: Any) -> Settings:
    return Settings(
        **s3_store(endpoint, f"s3://bk-{uuid.uuid4().hex[:8]}/pq"),
        **changes,
    )


def test_collections_side_by_side_and_delete(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path, other_model: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, batch_size=8))
    a, b = folder_of(tmp_path, "a", range(0, 6)), folder_of(tmp_path, "b", range(10, 15))
    index(rt, "alpha", a, tiny_model)
    index(rt, "beta", b, other_model)
    assert list_collections(rt.store) == ["alpha", "beta"]
    da, db = describe_collection(rt.store, rt.redis, "alpha"), describe_collection(rt.store, rt.redis, "beta")
    assert (da["dim"], da["images"], db["dim"], db["images"]) == (256, 6, 512, 5)
    # Each collection answers only with its own images, even for the other's photos.
    assert {name for _, _, name in ask(rt, "alpha", b / "b-10.png")} == {f"a-{s}.png" for s in range(6)}
    assert {name for _, _, name in ask(rt, "beta", a / "a-0.png")} == {f"b-{s}.png" for s in range(10, 15)}
    before = ask(rt, "beta", b / "b-12.png")

    deleted = delete_collection(rt.store, rt.redis, "alpha")
    assert deleted["deleted_objects"] > 0
    assert list_collections(rt.store) == ["beta"]
    assert not list(rt.redis.scan_iter(match="pupyl:alpha:*"))
    with pytest.raises(CollectionMissing):
        describe_collection(rt.store, rt.redis, "alpha")
    assert ask(rt, "beta", b / "b-12.png") == before
    assert describe_collection(rt.store, rt.redis, "beta")["images"] == 5
    with pytest.raises(ValueError, match="invalid collection name"):
        delete_collection(rt.store, rt.redis, "../beta")


def test_backup_from_s3_restore_to_local_and_back(
    redis_client: redis.Redis, redis_url: str, s3_endpoint: str, tmp_path: Path, tiny_model: Path
) -> None:
    base = redis_url.rsplit("/", 1)[0]
    s3 = Runtime(s3_settings(s3_endpoint, data_dir=tmp_path / "s3data", redis_url=f"{base}/3", batch_size=4))
    # a local-directory store; the S3 endpoint is configured too, as a destination for backups
    local = Runtime(
        s3_settings(s3_endpoint, data_dir=tmp_path / "local", redis_url=f"{base}/4").replace(store="")
    )
    for rt in (s3, local):
        rt.redis.flushdb()
    photos = folder_of(tmp_path, "p", range(20, 32))
    index(s3, "photos", photos, tiny_model)
    compact(s3, {"collection": "photos"})  # a snapshot, then more commits after it
    index(s3, "photos", folder_of(tmp_path, "q", range(40, 44)), tiny_model)
    first = ask(s3, "photos", photos / "p-21.png")
    remove(s3, {"collection": "photos", "id": first[0][0]})
    original = ask(s3, "photos", photos / "p-25.png")

    archive = tmp_path / "photos-backup.tar"
    assert backup(s3.store, s3.redis, "photos", str(archive), s3.settings)["files"] > 10
    restored = restore(str(archive), local.store, local.redis, local.settings)
    assert restored["collection"] == "photos" and restored["images"] == 15
    assert ask(local, "photos", photos / "p-25.png") == original
    commits = [key for _, key in local.coordinator("photos").commits_after(0)]
    sums = integrity.checksums(local.coordinator("photos"), commits)
    assert commits and all(sums[key] == integrity.sha256(local.store.get(key)) for key in commits)

    # ... and back, to another bucket through a store copy, under another name
    again = Runtime(s3_settings(s3_endpoint, data_dir=tmp_path / "again", redis_url=f"{base}/5"))
    again.redis.flushdb()
    copy = f"s3://copy-{uuid.uuid4().hex[:8]}/backups/photos"
    backup(local.store, local.redis, "photos", copy, local.settings)
    restore(copy, again.store, again.redis, again.settings, as_name="photos-copy")
    assert ask(again, "photos-copy", photos / "p-25.png") == original
    # indexing goes on after a restore: no id is reused
    index(again, "photos-copy", folder_of(tmp_path, "r", range(60, 62)), tiny_model)
    new_ids = {i for i, _, name in ask(again, "photos-copy", photos / "p-25.png") if name.startswith("r-")}
    assert new_ids and min(new_ids) > max(i for i, _, _ in original)
    with pytest.raises(RestoreError, match="not empty"):
        restore(str(archive), local.store, local.redis, local.settings)


def test_damaged_or_truncated_backup_is_refused(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url))
    index(rt, "src", folder_of(tmp_path, "s", range(3)), tiny_model)
    archive = tmp_path / "b.tar"
    backup(rt.store, rt.redis, "src", str(archive), rt.settings)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(RestoreError, match="damaged|incomplete"):
        restore(str(cut), rt.store, rt.redis, rt.settings, as_name="from-cut")
    assert not rt.store.children(Layout("from-cut").root)  # nothing written
    folder = tmp_path / "copy"
    backup(rt.store, rt.redis, "src", folder.as_uri(), rt.settings)
    victim = next(p for p in folder.rglob("*.json") if C.STORE_META in p.parts)
    victim.write_bytes(victim.read_bytes().replace(b"sha256", b"sha257"))
    with pytest.raises(RestoreError, match="checksum"):
        restore(folder.as_uri(), rt.store, rt.redis, rt.settings, as_name="from-altered")
    assert not rt.store.children(Layout("from-altered").root)
    shutil.rmtree(folder)


def test_originals_are_kept_when_asked(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path / "data", redis_url=redis_url, keep_originals=True))
    folder = folder_of(tmp_path, "o", range(2))
    index(rt, "kept", folder, tiny_model)
    hits = ask(rt, "kept", folder / "o-1.png")
    image_id = hits[0][0]
    assert rt.store.get(Layout("kept").original(image_id)) == (folder / "o-1.png").read_bytes()
    remove(rt, {"collection": "kept", "id": image_id})
    assert not rt.store.exists(Layout("kept").original(image_id))
