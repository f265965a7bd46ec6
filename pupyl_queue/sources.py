"""Expanding an index URI into the image references it names.

For now: a local directory (recursive; symlinks that lead out of it are not
followed), a single image file, a glob, and a tar archive (plain, gz, bz2, xz)
read as a stream. Each reference yields its bytes or the reason it has none.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any


class SourceError(ValueError):
    """The URI itself cannot be read (the whole job fails with this reason)."""


@dataclass
class SourceItem:
    ref: str
    data: bytes | None = None
    error: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def expand(uri: str, max_bytes: int) -> Iterator[SourceItem]:
    path_text = uri.removeprefix("file://")
    if "://" in path_text:
        raise SourceError(f"unsupported URI scheme in {uri!r} (for now: local paths and tar archives)")
    path = Path(path_text).expanduser()
    if path.is_dir():
        yield from _directory(path, max_bytes)
    elif path.is_file():
        if path.name.lower().endswith(TAR_SUFFIXES) or _is_tar(path):
            yield from _tar(path, max_bytes)
        else:
            yield _file(path, path.name, max_bytes)
    elif glob.has_magic(path_text):
        matches = sorted(glob.glob(os.path.expanduser(path_text), recursive=True))
        if not matches:
            raise SourceError(f"the pattern {uri!r} matches nothing")
        for match in matches:
            if os.path.isfile(match):
                yield _file(Path(match), match, max_bytes)
    else:
        raise SourceError(f"no such file or directory: {uri!r}")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _file_meta(path: Path, size: int) -> dict[str, Any]:
    stat = path.stat()
    return {
        "original_file_name": path.name,
        "original_path": str(path.parent.resolve()),
        "original_file_size": size,
        "original_access_time": stat.st_atime,
    }


def _file(path: Path, ref: str, max_bytes: int) -> SourceItem:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return SourceItem(
                ref, error=f"file too large: {size} bytes > {max_bytes} (PUPYL_MAX_IMAGE_BYTES)"
            )
        return SourceItem(ref, path.read_bytes(), meta=_file_meta(path, size))
    except OSError as exc:
        return SourceItem(ref, error=f"cannot read: {exc.strerror or exc}")


def _directory(root: Path, max_bytes: int) -> Iterator[SourceItem]:
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
            yield _file(path, str(path), max_bytes)


def _tar(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    try:
        archive = tarfile.open(path, "r|*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"cannot open archive {path}: {exc}") from None
    with archive:
        try:
            for member in archive:
                ref = f"{path}#{member.name}"
                if not member.isfile():
                    continue
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    yield SourceItem(ref, error="unsafe path in archive (absolute or '..'); skipped")
                    continue
                if member.size > max_bytes:
                    yield SourceItem(ref, error=f"member too large: {member.size} bytes > {max_bytes}")
                    continue
                fh = archive.extractfile(member)
                data = fh.read() if fh is not None else b""
                meta = {
                    "original_file_name": name.name,
                    "original_path": f"{path}#{name.parent}",
                    "original_file_size": member.size,
                    "original_access_time": float(member.mtime),
                }
                yield SourceItem(ref, data, meta=meta)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield SourceItem(f"{path}#?", error=f"archive is damaged from here on: {exc}")
