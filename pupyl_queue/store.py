"""The object store: the source of truth (DESIGN.md principle 1).

One small interface, two implementations: a local directory (the embedded
default) and S3 through the minio SDK. Keys are '/'-separated relative paths;
a key that tries to leave its root is refused. Every put is atomic: a reader
sees the old object or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse

from pupyl_queue.settings import Settings

T = TypeVar("T")
CHUNK = 8 * 1024**2  # bytes per read when streaming a file


class ObjectNotFound(KeyError):
    """No object under that key."""


class StoreUnavailable(ConnectionError):
    """The store cannot be reached now; the operation can be retried."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid store key {key!r}")
    return key


class ObjectStore(ABC):
    url: str
    # A put waits on the network (S3): a caller with other work to do overlaps its puts (decode_pool).
    remote: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in '/' or ''), sorted."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (like a directory listing), without a full scan."""

    @abstractmethod
    def sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Every key under ``prefix`` with its size in bytes, sorted: what a listing checks before
        anything is read (an s3:// source, a job's uploads)."""

    @abstractmethod
    def list_modified(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        """Every key under ``prefix`` with its last-modified time (epoch seconds): how housekeeping
        tells leftovers (an upload cut off, a query never searched) from live work."""

    def put_file(self, key: str, path: str | Path) -> None:
        """Store a file's content; stores override this to stream it (a snapshot index can be gigabytes)."""
        self.put(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | Path) -> None:
        """Write an object's content to ``path``; stores override this to stream it."""
        Path(path).write_bytes(self.get(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several objects (missing ones are no error); S3 does it in one request per 1,000."""
        for key in keys:
            self.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._folders: set[Path] = set()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        """Write through a temporary file and rename it in place: readers never see half an object."""
        path = self._path(key)
        if path.parent not in self._folders:  # one mkdir per folder per process, not per object
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:  # the folder was deleted meanwhile (delete_prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, key: str, data: bytes) -> None:
        self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as src:
            self._write(key, lambda fh: shutil.copyfileobj(src, fh, CHUNK))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def get_file(self, key: str, path: str | Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return iter(sorted(keys))

    def children(self, prefix: str) -> list[str]:
        base = self.root.joinpath(*prefix.strip("/").split("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".tmp-"))

    def list_modified(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        return ((key, info.st_mtime) for key, info in self._stats(prefix))

    def sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return ((key, info.st_size) for key, info in self._stats(prefix))

    def _stats(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        for key in self.list(prefix):
            try:
                yield key, self._path(key).stat()
            except FileNotFoundError:  # deleted meanwhile
                continue

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``, and with them what only a directory has: the
        folders left empty and temporary files of writes that never finished (a writer killed
        mid-put leaves its ``.tmp-`` file). Without this, finished jobs left empty
        ``uploads/<job>/`` and ``staging/<job>/`` folders, and a cut-off upload a zero-byte file.
        """
        deleted = super().delete_prefix(prefix)
        if not prefix.strip("/"):
            return deleted  # never the store's own root
        base = self.root.joinpath(*prefix.rstrip("/").split("/"))
        if not base.is_dir():
            return deleted
        for dirpath, _dirs, files in os.walk(base, topdown=False):
            for name in files:
                if name.startswith(".tmp-"):
                    Path(dirpath, name).unlink(missing_ok=True)
            try:
                os.rmdir(dirpath)
                self._folders.discard(Path(dirpath))
            except OSError:  # not empty: a put under the prefix landed meanwhile; it stays
                pass
        return deleted


class S3Store(ObjectStore):
    """Any S3 server (MinIO in production) through the minio SDK; creates its bucket, unless
    ``create`` is false (a source bucket is read, never made)."""

    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = True,
        region: str = "",
        create: bool = True,
    ) -> None:
        import urllib3
        from minio import Minio

        self.url = f"s3://{bucket}/{prefix.strip('/')}"
        if not endpoint:
            raise ValueError("an s3:// store needs PUPYL_S3_ENDPOINT (host:port)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region or None,
            # Few, quick retries here: tasks retry a StoreUnavailable with backoff themselves.
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5, read=120),
                retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
                maxsize=16,
            ),
        )
        if create:
            self._guard(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            self._client.make_bucket(self.bucket)

    def _guard(self, fn: Callable[[], T], key: str = "") -> T:
        """Map the SDK's errors onto the store's: missing object, or store unreachable."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        except (HTTPError, OSError) as exc:
            raise StoreUnavailable(f"S3 store {self.url} unreachable: {type(exc).__name__}") from exc

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        self._guard(
            lambda: self._client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))
        )

    def get(self, key: str) -> bytes:
        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, self._name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._guard(fetch, key)

    def get_at_most(self, key: str, limit: int) -> bytes:
        """The object's bytes, read no further than ``limit`` + 1 (the caller refuses a longer one):
        an object named by a message is read without trusting its size."""

        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, self._name(key))
            try:
                return response.read(limit + 1)
            finally:
                response.close()
                response.release_conn()

        return self._guard(fetch, key)

    def sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        objects = self._guard(
            lambda: list(self._client.list_objects(self.bucket, self.prefix + prefix, recursive=True))
        )
        for o in sorted(objects, key=lambda o: o.object_name):
            yield o.object_name[len(self.prefix) :], int(o.size or 0)

    def put_file(self, key: str, path: str | Path) -> None:
        """Multipart upload straight from the file (the SDK picks the part size)."""
        self._guard(lambda: self._client.fput_object(self.bucket, self._name(key), str(path)))

    def get_file(self, key: str, path: str | Path) -> None:
        self._guard(lambda: self._client.fget_object(self.bucket, self._name(key), str(path)), key)

    def exists(self, key: str) -> bool:
        try:
            self._guard(lambda: self._client.stat_object(self.bucket, self._name(key)), key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._guard(lambda: self._client.remove_object(self.bucket, self._name(key)))

    def delete_many(self, keys: Iterable[str]) -> None:
        from minio.deleteobjects import DeleteObject

        names = [DeleteObject(self._name(key)) for key in keys]
        if not names:
            return
        # The SDK sends one DeleteObjects request per 1,000 names as its errors are read.
        errors = self._guard(lambda: list(self._client.remove_objects(self.bucket, names)))
        if errors:
            raise RuntimeError(f"S3 store {self.url}: {len(errors)} deletes failed, e.g. {errors[0]}")

    def list(self, prefix: str = "") -> Iterator[str]:
        objects = self._guard(
            lambda: list(self._client.list_objects(self.bucket, self.prefix + prefix, recursive=True))
        )
        return iter(sorted(o.object_name[len(self.prefix) :] for o in objects))

    def list_modified(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        objects = self._guard(
            lambda: list(self._client.list_objects(self.bucket, self.prefix + prefix, recursive=True))
        )
        for o in sorted(objects, key=lambda o: o.object_name):
            yield o.object_name[len(self.prefix) :], o.last_modified.timestamp()

    def children(self, prefix: str) -> list[str]:
        folder = self.prefix + prefix.strip("/") + "/" if prefix.strip("/") else self.prefix
        objects = self._guard(lambda: list(self._client.list_objects(self.bucket, folder, recursive=False)))
        return sorted(o.object_name[len(folder) :].rstrip("/") for o in objects)


class OverlappedWrites:
    """Writes to a store that overlap the caller's other work when the store is remote (S3: a put
    waits on the network); made in line for a local store, whose put does not wait.

    ``pool`` gives the threads (asked for only when the store is remote); at most ``bound`` writes
    are in flight (0: no bound). :meth:`wait` returns once every write has landed; the first that
    failed raises, and those not started yet are cancelled: a store that failed is not tried again
    and again for nothing. Used by the decode processes (stored copies) and the ingest (staging).
    """

    def __init__(self, store: ObjectStore, pool: Callable[[], Executor], bound: int = 0) -> None:
        self.store, self._pool, self.bound = store, pool, bound
        self._pending: list[Future[object]] = []

    def submit(self, write: Callable[..., object], *args: object) -> None:
        if not self.store.remote:
            write(*args)
            return
        if self.bound and len(self._pending) >= self.bound:  # bounds the bytes held for writes in flight
            self._landed(self._pending.pop(0))
        self._pending.append(self._pool().submit(write, *args))

    def wait(self) -> None:
        while self._pending:
            self._landed(self._pending.pop(0))

    def _landed(self, future: Future[object]) -> None:
        try:
            future.result()
        except BaseException:
            for waiting in self._pending:
                waiting.cancel()
            self._pending = []
            raise


def open_store(settings: Settings) -> ObjectStore:
    url = settings.store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "s3":
        return S3Store(
            parsed.netloc,
            parsed.path,
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_secure,
            settings.s3_region,
        )
    raise ValueError(f"unsupported store {url!r}")
