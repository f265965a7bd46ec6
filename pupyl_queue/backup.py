"""Backup and restore of one collection, to and from an archive or another store.

A backup holds what rebuilds the collection exactly: its manifest and model
files, the newest snapshot with its vector files, every segment and
tombstone committed after it (in commit order), images, metadata and job
reports, plus ``pupyl-backup.json``: every file's size and sha256, the commit
order and the id counter. Restore checks all of it before writing anything,
into an empty collection (of any name, on any store kind), then rebuilds the
collection's Redis state (id counter, commit log, dedup map, image count, callers' key map,
metadata range index and removed ids).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import redis

from pupyl_queue import constants as C
from pupyl_queue import integrity, keys
from pupyl_queue.codecs import read_manifest, read_pointer
from pupyl_queue.coordination import Coordinator
from pupyl_queue.integrity import seal
from pupyl_queue.layout import Layout
from pupyl_queue.metadata import rebuild_index
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound, ObjectStore, open_store

MANIFEST = "pupyl-backup.json"
FORMAT = "pupyl-queue collection backup"
SKIPPED = (
    C.STORE_STAGING,
    C.STORE_QUERIES,
    C.STORE_SNAPSHOTS,
    C.STORE_VECTORS,
    C.STORE_SEGMENTS,
    C.STORE_TOMBSTONES,
)


class RestoreError(ValueError):
    """The backup is damaged, incomplete or cannot go where it was asked to; nothing was written."""


def _is_store_url(dest: str) -> bool:
    return dest.startswith(("s3://", "file://"))


def _other_store(url: str, settings: Settings) -> ObjectStore:
    return open_store(settings.replace(store=url))


# --- backup
def _members(store: ObjectStore, coord: Coordinator) -> tuple[list[str], list[str], int]:
    """(files relative to the collection root, commits after the snapshot in order, watermark)."""
    layout = coord.layout
    root = layout.root + "/"
    snapshot = read_pointer(store, layout)
    watermark = snapshot["watermark"] if snapshot else 0
    files = [k[len(root) :] for k in store.list(root) if k[len(root) :].split("/", 1)[0] not in SKIPPED]
    if snapshot:
        base = snapshot["path"][len(root) :]
        files += [f"{base}/{name}" for name in (*snapshot["files"], "manifest.json")]
        files += [k[len(root) :] for k in snapshot["vector_files"]]
        files.append(layout.snapshot_pointer[len(root) :])
    commits = []
    for _, key in coord.commits_after(watermark):
        if store.exists(key):
            commits.append(key[len(root) :])
    return sorted(set(files)) + commits, commits, watermark


def backup(
    store: ObjectStore, client: redis.Redis, name: str, dest: str, settings: Settings
) -> dict[str, Any]:
    layout = Layout(name)
    if read_manifest(store, layout) is None:
        raise ValueError(f"no collection {name!r} to back up")
    coord = Coordinator(client, layout)
    files, commits, watermark = _members(store, coord)
    writer = _StoreWriter(_other_store(dest, settings)) if _is_store_url(dest) else _TarWriter(Path(dest))
    entries = []
    with writer:
        for rel in files:
            data = store.get(f"{layout.root}/{rel}")
            writer.add(rel, data)
            entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {
            "format": FORMAT,
            "version": 1,
            "collection": name,
            "created_at": time.time(),
            "watermark": watermark,
            "next_id": int(client.get(layout.key(C.KEY_ID_COUNTER)) or 0),
            "commits": commits,
            "files": entries,
        }
        writer.add(MANIFEST, json.dumps(manifest, indent=1).encode())
    return {"collection": name, "dest": dest, "files": len(entries), "bytes": sum(e["size"] for e in entries)}


class _TarWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(path.name + ".part")
        self.path = path
        self.tar = tarfile.open(self.tmp, "w:gz" if path.name.endswith("gz") else "w")  # noqa: SIM115

    def add(self, rel: str, data: bytes) -> None:
        info = tarfile.TarInfo(rel)
        info.size = len(data)
        info.mtime = int(time.time())
        self.tar.addfile(info, io.BytesIO(data))

    def __enter__(self) -> _TarWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.tar.close()
        if kind is None:
            self.tmp.replace(self.path)  # a finished archive appears whole, or not at all
        else:
            self.tmp.unlink(missing_ok=True)


class _StoreWriter:
    def __init__(self, target: ObjectStore) -> None:
        if any(True for _ in target.list("")):
            raise ValueError(f"backup destination {target.url} is not empty")
        self.target = target

    def add(self, rel: str, data: bytes) -> None:
        self.target.put(rel, data)

    def __enter__(self) -> _StoreWriter:
        return self

    def __exit__(self, *_: object) -> None:
        pass


# --- restore
def _read_source(src: str, settings: Settings) -> tuple[dict[str, Any], Any]:
    """The backup's manifest, and a function giving each file's bytes."""
    if _is_store_url(src):
        source = _other_store(src, settings)
        try:
            manifest = json.loads(source.get(MANIFEST))
        except ObjectNotFound:
            raise RestoreError(f"{src} holds no {MANIFEST}: not a complete pupyl-queue backup") from None

        def files() -> Iterator[tuple[str, bytes]]:
            for entry in manifest["files"]:
                try:
                    yield entry["path"], source.get(entry["path"])
                except ObjectNotFound:
                    raise RestoreError(f"the backup lacks {entry['path']}") from None

        return manifest, files
    path = Path(src)
    if not path.is_file():
        raise RestoreError(f"no backup archive at {src}")

    def tar_files() -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile():
                        handle = tar.extractfile(member)
                        yield member.name, handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise RestoreError(f"the archive {src} is damaged or truncated: {exc}") from None

    manifest = None
    for name, data in tar_files():
        if name == MANIFEST:
            manifest = json.loads(data)
    if manifest is None:
        raise RestoreError(f"the archive {src} holds no {MANIFEST}: incomplete")
    return manifest, tar_files


def _verify(manifest: dict[str, Any], files: Any) -> None:
    if manifest.get("format") != FORMAT:
        raise RestoreError("not a pupyl-queue collection backup")
    expected = {e["path"]: e for e in manifest["files"]}
    for rel in expected:
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts:
            raise RestoreError(f"unsafe path in the backup: {rel!r}")
    seen = set()
    for rel, data in files():
        entry = expected.get(rel)
        if entry is None:
            continue
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RestoreError(f"{rel} does not match its checksum: the backup is damaged")
        seen.add(rel)
    missing = sorted(set(expected) - seen)
    if missing:
        raise RestoreError(f"the backup is incomplete: {len(missing)} files missing, e.g. {missing[0]}")


def _rewrite(rel: str, data: bytes, old_root: str, new_root: str) -> bytes:
    """Snapshot manifests and the pointer name keys under the collection root: move them."""
    parts = rel.split("/")
    if parts[0] != C.STORE_SNAPSHOTS or not rel.endswith(".json") or old_root == new_root:
        return data
    doc = json.loads(data)
    doc["path"] = doc["path"].replace(old_root, new_root, 1)
    if "vector_files" in doc:
        doc["vector_files"] = [k.replace(old_root, new_root, 1) for k in doc["vector_files"]]
    if "vector_sha256" in doc:
        doc["vector_sha256"] = {k.replace(old_root, new_root, 1): v for k, v in doc["vector_sha256"].items()}
    if "checksum" in doc:  # moved on purpose (the archive was verified): sealed again, or readers reject it
        doc = seal(doc)
    return json.dumps(doc, indent=2).encode()


def restore(
    src: str, store: ObjectStore, client: redis.Redis, settings: Settings, as_name: str | None = None
) -> dict[str, Any]:
    manifest, files = _read_source(src, settings)
    _verify(manifest, files)
    name = as_name or manifest["collection"]
    layout = Layout(name)
    if store.children(layout.root) or client.exists(layout.key(C.KEY_SEQUENCE)):
        raise RestoreError(f"collection {name!r} is not empty: restore into a new name with --as")
    old_root = f"{C.STORE_COLLECTIONS}/{manifest['collection']}"
    wanted = {e["path"] for e in manifest["files"]}
    commits = set(manifest["commits"])
    coord = Coordinator(client, layout)
    for rel, data in files():
        if rel not in wanted:
            continue
        written = _rewrite(rel, data, old_root, layout.root)
        store.put(f"{layout.root}/{rel}", written)
        if rel in commits:  # readers check committed segments and tombstones against it
            integrity.record_checksum(coord, f"{layout.root}/{rel}", written)
    hashes = rebuild_index(store, client, layout, _removed(store, layout, manifest["commits"]))
    model = read_manifest(store, layout)["model"]  # type: ignore[index]
    client.set(layout.key("model"), json.dumps(model, sort_keys=True))
    client.set(layout.key(C.KEY_ID_COUNTER), manifest["next_id"])
    client.set(layout.key(C.KEY_SEQUENCE), manifest["watermark"])
    coord.set_snapshot_watermark(manifest["watermark"])
    for rel in manifest["commits"]:
        coord.publish(f"{layout.root}/{rel}")
    client.set(layout.key(C.KEY_COUNT), len(hashes))
    if hashes:
        client.hset(layout.key(C.KEY_HASHES), mapping={k: str(v) for k, v in hashes.items()})
    key_map = keys.restore_key_map(store, coord)
    return {"collection": name, "files": len(wanted), "images": len(hashes), "from": src, **key_map}


def _removed(store: ObjectStore, layout: Layout, commits: list[str]) -> set[int]:
    """Every removed id of the restored collection: its snapshot's removed list and the tombstones
    committed after it (their metadata must read as absent, pupyl_queue/metadata.py)."""
    tombstones = [rel for rel in commits if rel.startswith(f"{C.STORE_TOMBSTONES}/")]
    removed = {int(rel.rsplit("/", 1)[-1].split(".")[0]) for rel in tombstones}
    snapshot = read_pointer(store, layout)
    if snapshot is not None:
        dead = integrity.snapshot_file(store, snapshot, "tombstones.npy")
        removed.update(np.frombuffer(dead, np.int64).tolist())
    return removed
