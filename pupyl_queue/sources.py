"""Expanding an index URI into the image references it names.

A URI is a local directory (recursive; no symlink out of it is followed), an
image file, a glob, an archive (tar, tar.gz/bz2/xz, zip), a list of references
(CSV first column or plain text, also gz/bz2/xz/zip-compressed), an http(s)
URL of any of these, or ``s3://bucket/prefix`` on the configured endpoint.
What a file is, is sniffed from its bytes, never taken from its name.

Each reference becomes a :class:`SourceItem` holding its bytes, a URL still to
fetch (fetched concurrently, in windows, by :func:`fetch_pending`), or the
reason it has neither. Only a URI that cannot be read at all raises.
"""

from __future__ import annotations

import glob
import io
import json
import lzma
import os
import stat
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

from pupyl_queue.content import BombGuard, decompress, is_tar, sniff, too_large, unsafe_name
from pupyl_queue.fetch import Fetcher, FetchError
from pupyl_queue.images import FORMATS
from pupyl_queue.lists import read_list
from pupyl_queue.settings import Settings

ORIGINS = ("local", "network")


OUTSIDE_ROOTS = "refused: local path outside the allowed roots (PUPYL_ALLOWED_ROOTS)"


class SourceError(ValueError):
    """The URI itself cannot be read (the whole job fails with this reason)."""


class LocalRefused(Exception):
    """A local path that is not read; the message is the per-item reason."""


class ObjectRefused(LocalRefused):
    """An s3:// object named by reference that is not read (gone, too large, access denied): per item,
    as a refused local file is. An unreachable S3 server is not this: it stays StoreUnavailable."""


@dataclass
class SourceItem:
    ref: str
    data: bytes | None = None
    error: str = ""
    url: str = ""  # still to fetch
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the caller's key (lists with a key column or field)
    attributes: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # a local image the embed worker reads itself (PUPYL_LOCAL_REFERENCES); no data
    s3: str = ""  # s3://bucket/key, an object the embed worker reads itself (PUPYL_S3_REFERENCES); no data
    upload: str = ""  # a job's upload in the store, read by the embed worker (kept until the job ends)

    def reference(self) -> tuple[str, str]:
        """The embed item's field and value when the embed worker reads the bytes itself, else ("", "")."""
        for kind in ("path", "s3", "upload"):
            if getattr(self, kind):
                return kind, getattr(self, kind)
        return "", ""


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def url_meta(url: str, size: int) -> dict[str, Any]:
    path = urlparse(url).path
    return {
        "original_file_name": unquote(path.rsplit("/", 1)[-1]) or url,
        "original_path": url.rsplit("/", 1)[0],
        "original_file_size": size,
        "original_access_time": None,
    }


class Sources:
    """Expands URIs for one job; ``origin="network"`` confines local paths to PUPYL_ALLOWED_ROOTS."""

    def __init__(
        self,
        settings: Settings,
        origin: str = "network",
        fetcher: Fetcher | None = None,
        references: bool = False,
        s3_references: bool = False,
    ) -> None:
        """``references``: a local image is yielded as its resolved path (``SourceItem.path``), not its
        bytes, for an embed worker that reads the same files (PUPYL_LOCAL_REFERENCES).
        ``s3_references``: an s3:// object is yielded as its name (``SourceItem.s3``), for embed
        workers with the same S3 settings (PUPYL_S3_REFERENCES)."""
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}")
        self.settings = settings
        self.origin = origin
        self.fetcher = fetcher or Fetcher(settings)
        self.references = references
        self.s3_references = s3_references
        self._roots: list[str] | None = None  # allowed_root_paths, each ending in a separator
        self._folders: dict[str, str] = {}  # a listed folder -> its resolved path (_file_meta)

    # --- entry point
    def expand(self, uri: str) -> Iterator[SourceItem]:
        uri = uri.strip()
        if is_url(uri):
            yield from self._remote(uri)
        elif uri.startswith("s3://"):
            yield from self._s3(uri)
        elif "://" in uri and not uri.startswith("file://"):
            raise SourceError(f"unsupported URI scheme in {uri!r}: use a path, http(s)://, s3:// or file://")
        else:
            yield from self._local(uri.removeprefix("file://"))

    def listed(self, rows: list[Any]) -> Iterator[SourceItem]:
        """The images a request lists with their keys (``[{"uri", "key", "attributes"}]``), read as a
        JSON Lines list: a bad row is one failed item (``items:<n>``). Local paths are absolute and,
        for ``origin="network"``, under PUPYL_ALLOWED_ROOTS (checked when each is opened)."""
        raw = "\n".join(json.dumps(row) for row in rows).encode()
        yield from self._list("items", raw, base=Path("/"), header=False)

    # --- local paths
    def local_path_error(self, path: Path) -> str:
        """Why a path may not be read for this request ('' when it may).

        The path is resolved first, symlinks included, so a link inside a root that leads out of it
        is refused too. The answer does not depend on whether the path exists.
        """
        if self.origin == "local":
            return ""
        return self._outside_roots(os.path.realpath(path))

    def _outside_roots(self, real: str) -> str:
        """The roots check of a path already resolved: one string test per root.

        The roots are resolved once per Sources (a job, or a decode process): an ingest lists
        thousands of files, and resolving every root for each of them was a third of its CPU."""
        if self._roots is None:
            self._roots = [
                str(root) if str(root).endswith(os.sep) else str(root) + os.sep
                for root in self.settings.allowed_root_paths
            ]
        if any((real + os.sep).startswith(root) for root in self._roots):  # under a root, or the root
            return ""
        return OUTSIDE_ROOTS

    def read_local(self, path: str) -> bytes:
        """A local image's bytes, through open_local, at most PUPYL_MAX_IMAGE_BYTES (else LocalRefused)."""
        fh, _ = self.open_local(Path(path))
        try:
            with fh:
                data = fh.read(self.settings.max_image_bytes + 1)
        except OSError as exc:
            raise LocalRefused(f"cannot read: {exc.strerror or exc}") from None
        if len(data) > self.settings.max_image_bytes:
            raise LocalRefused(too_large(len(data), self.settings.max_image_bytes))
        return data

    def read_reference(self, ref: str) -> bytes:
        """An item's bytes by reference: an s3:// object (:meth:`read_object`) or a local path."""
        return self.read_object(ref) if ref.startswith("s3://") else self.read_local(ref)

    def read_object(self, ref: str) -> bytes:
        """An s3:// object's bytes (PUPYL_S3_REFERENCES), at most PUPYL_MAX_IMAGE_BYTES (else
        ObjectRefused, as for anything else that fails this item alone).

        Read in the embed worker's decode processes: each keeps one client per bucket. An
        unreachable server raises StoreUnavailable, so the batch is retried, not its items failed.
        """
        from pupyl_queue.store import ObjectNotFound, StoreUnavailable

        parsed = urlparse(ref)
        try:
            data = _bucket(self.settings, parsed.netloc).get_at_most(
                parsed.path.lstrip("/"), self.settings.max_image_bytes
            )
        except StoreUnavailable:
            raise
        except ObjectNotFound:
            raise ObjectRefused("no such object (deleted since it was listed?)") from None
        except Exception as exc:  # the SDK's S3Error (access denied, ...), a bad key
            raise ObjectRefused(f"cannot fetch: {type(exc).__name__}: {exc}") from None
        if len(data) > self.settings.max_image_bytes:
            raise ObjectRefused(too_large(len(data), self.settings.max_image_bytes))
        return data

    def open_local(self, path: Path) -> tuple[IO[bytes], os.stat_result]:
        """Open a local file for reading: the one gate every local path passes before ``open()``.
        See :meth:`_open_real`."""
        _, fh, info = self._open_real(path)
        return fh, info

    def _open_real(self, path: Path) -> tuple[str, IO[bytes], os.stat_result]:
        """open_local, also giving the resolved path the file was opened by.

        Roots first (so a refusal says nothing about what exists outside them), then only a regular
        file is opened: a FIFO or a device would block the reading thread forever. The file is opened
        non-blocking and checked again on its descriptor, so a file swapped for a pipe between the
        check and the open is refused too. Raises :class:`LocalRefused` with the per-item reason.
        """
        real = os.path.realpath(path)  # opened by this name, so a link swapped in later is not followed
        refused = "" if self.origin == "local" else self._outside_roots(real)
        if refused:
            raise LocalRefused(refused)
        try:
            before = os.stat(real)
        except FileNotFoundError:
            raise LocalRefused("no such file or directory") from None
        except OSError as exc:
            raise LocalRefused(f"cannot read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(before.st_mode):
            raise LocalRefused(f"not a regular file ({_file_kind(before.st_mode)}); skipped")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise LocalRefused(f"cannot read: {exc.strerror or exc}") from None
        opened = os.fstat(fd)
        same = (opened.st_dev, opened.st_ino) == (before.st_dev, before.st_ino)
        if not (stat.S_ISREG(opened.st_mode) and same):
            os.close(fd)
            raise LocalRefused("the file changed while it was opened; skipped")
        return real, os.fdopen(fd, "rb"), opened

    def local_uri_error(self, text: str) -> str:
        """Why a local path or glob may not be expanded for this request ('' when it may).

        Checked before anything is looked up or listed, so a refusal tells nothing about what
        exists outside the roots. A glob is judged by its leading part without wildcards (every
        match lies under it), and each match again when it is opened.
        """
        if self.origin == "local":
            return ""
        text = text.removeprefix("file://")
        if ".." in PurePosixPath(text).parts:
            return "refused: '..' in a path"
        path = Path(text).expanduser()
        return self.local_path_error(_glob_anchor(str(path)) if glob.has_magic(text) else path)

    def _local(self, text: str) -> Iterator[SourceItem]:
        path = Path(text).expanduser()
        refused = self.local_uri_error(text)
        if refused:
            raise SourceError(f"{text}: {refused}")
        if glob.has_magic(text) and not os.path.lexists(path):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise SourceError(f"the pattern {text!r} matches nothing")
            for match in matches:
                if not os.path.isdir(match):
                    yield from self._local_file(Path(match), top=False)
            return
        if not os.path.exists(path):
            raise SourceError(f"no such file or directory: {text!r}")
        if os.path.isdir(path):
            yield from self._directory(path)
        else:
            yield from self._local_file(path, top=True)

    def _local_file(self, path: Path, top: bool) -> Iterator[SourceItem]:
        ref = str(path)
        try:
            real, fh, info = self._open_real(path)
        except LocalRefused as exc:
            if top:
                raise SourceError(f"{ref}: {exc}") from None
            yield SourceItem(ref, error=str(exc))
            return
        size = info.st_size
        try:
            with fh:
                head = fh.read(512)
                kind = sniff(head)
                if kind in ("tar", "zip", "compressed", "list") and (top or kind != "list"):
                    fh.seek(0)
                    yield from self._blob(ref, fh, size, depth=0, base=path.parent)
                    return
                if size > self.settings.max_image_bytes:
                    yield SourceItem(ref, error=too_large(size, self.settings.max_image_bytes))
                    return
                if self.references:  # the embed worker opens it again, through open_local
                    yield SourceItem(ref, path=real, meta=self._file_meta(path, size, info))
                    return
                fh.seek(0)
                data = fh.read(self.settings.max_image_bytes + 1)
                info = os.fstat(fh.fileno())  # after the read: its access time, as a second read sees it
        except OSError as exc:
            yield SourceItem(ref, error=f"cannot read: {exc.strerror or exc}")
            return
        if len(data) > self.settings.max_image_bytes:  # it grew after the stat
            yield SourceItem(ref, error=too_large(len(data), self.settings.max_image_bytes))
            return
        yield SourceItem(ref, data, meta=self._file_meta(path, size, info))

    def _file_meta(self, path: Path, size: int, info: os.stat_result) -> dict[str, Any]:
        folder = str(path.parent)
        if folder not in self._folders:  # a folder's files share it: resolved once per job
            self._folders[folder] = os.path.realpath(folder)
        return {
            "original_file_name": path.name,
            "original_path": self._folders[folder],
            "original_file_size": size,
            "original_access_time": info.st_atime,
        }

    def _directory(self, root: Path) -> Iterator[SourceItem]:
        real_root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                if path.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(real_root) or not target.is_file():
                        yield SourceItem(str(path), error="symlink leads out of the indexed folder; skipped")
                        continue
                yield from self._local_file(path, top=False)

    # --- remote and S3
    def _remote(self, url: str) -> Iterator[SourceItem]:
        try:
            fh = self.fetcher.download(url, self.settings.max_archive_bytes)
        except FetchError as exc:
            raise SourceError(f"cannot fetch {url}: {exc}") from None
        with fh:
            head = fh.read(512)
            fh.seek(0, io.SEEK_END)
            size = fh.tell()
            fh.seek(0)
            kind = sniff(head)
            if kind == "html":
                raise SourceError(f"{url} is an HTML page, not an image, an archive or a list")
            if kind == "image" or kind == "other":
                yield SourceItem(url, fh.read(), meta=url_meta(url, size))
                return
            yield from self._blob(url, fh, size, depth=0, base=None)

    def _s3(self, uri: str) -> Iterator[SourceItem]:
        from pupyl_queue.store import StoreUnavailable

        parsed = urlparse(uri)
        s = self.settings
        try:
            source = _bucket(s, parsed.netloc)  # a source is read: listing a bucket not there makes none
            listed = list(source.sizes(parsed.path.lstrip("/")))
        except (StoreUnavailable, ValueError) as exc:
            raise SourceError(f"cannot list {uri}: {exc}") from None
        except Exception as exc:  # the SDK's S3Error: access denied, no such bucket, ...
            raise SourceError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from None
        for key, size in listed:
            ref = f"s3://{parsed.netloc}/{key}"
            meta = {"original_file_name": key.rsplit("/", 1)[-1], "original_path": ref.rsplit("/", 1)[0]}
            if size > s.max_image_bytes:
                yield SourceItem(ref, error=too_large(size, s.max_image_bytes))
                continue
            if self.s3_references:  # read by the embed worker: neither fetched here nor staged
                yield SourceItem(ref, meta={**meta, "original_file_size": size}, s3=ref)
                continue
            try:
                data = source.get(key)
            except Exception as exc:
                yield SourceItem(ref, error=f"cannot fetch: {type(exc).__name__}: {exc}")
                continue
            if len(data) > s.max_image_bytes:
                yield SourceItem(ref, error=too_large(len(data), s.max_image_bytes))
                continue
            yield SourceItem(ref, data, meta={**meta, "original_file_size": len(data)})

    # --- archives and lists (local, remote, or inside another archive)
    def _blob(
        self, ref: str, fh: IO[bytes], size: int, depth: int, base: Path | None
    ) -> Iterator[SourceItem]:
        kind = sniff(fh.read(512))
        fh.seek(0)
        if kind in ("tar", "zip") and depth >= self.settings.max_archive_depth:
            yield SourceItem(
                ref, error=f"nested archive deeper than {self.settings.max_archive_depth}; skipped"
            )
        elif kind == "tar" or (kind == "compressed" and is_tar(fh)):
            fh.seek(0)
            yield from self._tar(ref, fh, size, depth, base)
        elif kind == "zip":
            yield from self._zip(ref, fh, size, depth, base)
        elif kind == "compressed":
            try:
                text = decompress(fh.read(), self.settings.max_list_bytes)
            except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
                yield SourceItem(ref, error=f"damaged compressed file: {exc}")
                return
            yield from self._list(ref, text, base)
        elif kind == "list":
            yield from self._list(ref, fh.read(self.settings.max_list_bytes + 1), base)
        else:
            yield SourceItem(ref, fh.read(), meta=_member_meta(ref, size))

    def _member(self, ref: str, data: bytes, depth: int, base: Path | None) -> Iterator[SourceItem]:
        kind = sniff(data[:512])
        if kind in ("tar", "zip", "compressed", "list"):
            yield from self._blob(ref, io.BytesIO(data), len(data), depth + 1, base)
        else:
            yield SourceItem(ref, data, meta=_member_meta(ref, len(data)))

    def _refusal(self, name: str, link: str, size: int) -> str:
        """Why an archive member (tar or zip) is skipped before it is read; '' when it is read."""
        unsafe = unsafe_name(name)
        if unsafe:
            return unsafe
        if link:
            return f"link in archive ({link}); skipped"
        if size > self.settings.max_image_bytes:
            return too_large(size, self.settings.max_image_bytes)
        return ""

    def _tar(self, ref: str, fh: IO[bytes], size: int, depth: int, base: Path | None) -> Iterator[SourceItem]:
        guard = BombGuard(self.settings, size)
        try:
            archive = tarfile.open(fileobj=fh, mode="r|*")  # noqa: SIM115 - closed below
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield SourceItem(ref, error=f"damaged archive: {exc}")
            return
        with archive:
            try:
                for member in archive:
                    inner = f"{ref}#{member.name}"
                    if member.isdir():
                        continue
                    link = "symlink or hard link" if member.issym() or member.islnk() else ""
                    refused = self._refusal(member.name, link, member.size)
                    if refused:
                        yield SourceItem(inner, error=refused)
                    elif not member.isfile():
                        yield SourceItem(inner, error="not a regular file in archive; skipped")
                    else:
                        stop = guard.add(member.size)
                        if stop:
                            yield SourceItem(inner, error=stop)
                            return
                        extracted = archive.extractfile(member)
                        data = extracted.read() if extracted is not None else b""
                        yield from self._member(inner, data, depth, base)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                yield SourceItem(f"{ref}#?", error=f"archive is damaged from here on: {exc}")

    def _zip(self, ref: str, fh: IO[bytes], size: int, depth: int, base: Path | None) -> Iterator[SourceItem]:
        guard = BombGuard(self.settings, size)
        try:
            archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError) as exc:
            yield SourceItem(ref, error=f"damaged archive: {exc}")
            return
        limit = self.settings.max_image_bytes
        with archive:
            for info in archive.infolist():
                inner = f"{ref}#{info.filename}"
                if info.is_dir():
                    continue
                link = "symlink" if stat.S_ISLNK(info.external_attr >> 16) else ""
                refused = self._refusal(info.filename, link, info.file_size)
                if refused:
                    yield SourceItem(inner, error=refused)
                    continue
                try:
                    with archive.open(info) as member:
                        data = member.read(limit + 1)  # the header's size may lie
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
                    yield SourceItem(inner, error=f"damaged archive member: {exc}")
                    continue
                if len(data) > limit:
                    yield SourceItem(inner, error=too_large(len(data), limit))
                    continue
                stop = guard.add(len(data))
                if stop:
                    yield SourceItem(inner, error=stop)
                    return
                yield from self._member(inner, data, depth, base)

    def _list(self, ref: str, raw: bytes, base: Path | None, header: bool = True) -> Iterator[SourceItem]:
        if len(raw) > self.settings.max_list_bytes:
            yield SourceItem(ref, error=f"list larger than {self.settings.max_list_bytes} bytes; skipped")
            return
        remote = base is None
        for row in read_list(ref, raw.decode("utf-8-sig", errors="replace")):
            entry, where = row.ref, row.where
            extra = {"key": row.key, "attributes": row.attributes}
            if row.error:
                yield SourceItem(entry, error=row.error, **extra)
            elif is_url(entry):
                yield SourceItem(entry, url=entry, meta={"list": where}, **extra)
            elif _looks_like_path(entry):
                if remote:
                    yield SourceItem(entry, error=f"local path in a remote list ({where}); refused")
                    continue
                path = Path(entry) if os.path.isabs(entry) else (base or Path(".")) / entry
                for item in self._local_file(path, top=False):
                    if item.error and item.ref == str(path):
                        item.ref, item.error = entry, f"{item.error} ({where})"
                    item.key, item.attributes = row.key, row.attributes
                    yield item
            elif header and row.line == 1 and not any(c in entry for c in "/\\."):
                continue  # a header line such as "url" or "path"
            else:
                yield SourceItem(entry[:200], error=f"neither a path nor a URL ({where})")


def fetch_pending(
    items: Iterable[SourceItem], fetcher: Fetcher, max_bytes: int, window: int
) -> Iterator[SourceItem]:
    """Fetch the URL items concurrently, ``window`` at a time, keeping the order."""
    pending: list[SourceItem] = []

    def flush() -> Iterator[SourceItem]:
        urls = [item.url for item in pending if item.url]
        results = iter(fetcher.fetch_many(urls, max_bytes))
        for item in pending:
            if item.url:
                got = next(results)
                if got.error:
                    item.error = got.error
                else:
                    item.data = got.data
                    item.meta = {**url_meta(item.url, len(got.data)), **item.meta}
                if got.attempts > 1:
                    item.meta["fetch_attempts"] = got.attempts
                item.url = ""
            yield item
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) >= window:
            yield from flush()
    yield from flush()


def _looks_like_path(entry: str) -> bool:
    return entry.startswith(("/", "./", "../", "~")) or "/" in entry or "." in Path(entry).name


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _glob_anchor(pattern: str) -> Path:
    """The leading part of a glob pattern without wildcards: every match lies under it."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _member_meta(ref: str, size: int) -> dict[str, Any]:
    outer, _, inner = ref.rpartition("#")
    name = PurePosixPath(inner or ref)
    where = f"{outer}#{name.parent}" if outer else str(name.parent)
    return {
        "original_file_name": name.name,
        "original_path": where,
        "original_file_size": size,
        "original_access_time": None,
    }


__all__ = ["FORMATS", "LocalRefused", "SourceError", "SourceItem", "Sources", "fetch_pending", "sniff"]


_buckets: dict[tuple[str, str, str, bool, str, str], Any] = {}
_buckets_lock = threading.Lock()
BUCKETS_KEPT = 16  # source buckets' clients a process keeps; their names come from requests


def _bucket(settings: Settings, bucket: str) -> Any:
    """This process's client of an s3:// source bucket (an S3Store, which never makes the bucket),
    made once and kept (the newest :data:`BUCKETS_KEPT`): each has its own pool of connections kept
    alive, for the expansion's listing and every object read by reference."""
    from pupyl_queue.store import S3Store

    key = (
        settings.s3_endpoint,
        settings.s3_access_key,
        settings.s3_secret_key,
        settings.s3_secure,
        settings.s3_region,
        bucket,
    )
    with _buckets_lock:
        found = _buckets.get(key)
    if found is None:
        found = S3Store(bucket, "", *key[:5], create=False)
        with _buckets_lock:
            if key not in _buckets and len(_buckets) >= BUCKETS_KEPT:
                _buckets.pop(next(iter(_buckets)))
            found = _buckets.setdefault(key, found)
    return found
