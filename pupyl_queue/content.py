"""What a stream of bytes is, and how far to trust it: sniffing, archive names, unpacking limits.

Sources (sources.py) never take a file's kind from its name: the first bytes decide. Archive member
names and decompressed sizes come from whoever made the file, so they are checked here before use.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from pathlib import PurePosixPath
from typing import IO, Any

from pupyl_queue.settings import Settings

OPENERS: dict[bytes, Any] = {
    b"\x1f\x8b": lambda fh: gzip.GzipFile(fileobj=fh),
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}


def sniff(head: bytes) -> str:
    """What bytes are: image, tar, zip, compressed, html, list (text) or other."""
    if _image_signature(head):
        return "image"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if any(head.startswith(magic) for magic in OPENERS):
        return "compressed"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "list"
        except UnicodeDecodeError:
            if len(head) >= 512:  # maybe a multi-byte character cut at the end
                try:
                    head[:-3].decode("utf-8")
                    return "list"
                except UnicodeDecodeError:
                    pass
    return "other"


def _image_signature(head: bytes) -> bool:
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    return head.startswith(b"BM") and len(head) >= 26 and head[6:10] == b"\x00\x00\x00\x00"


def is_tar(fh: IO[bytes]) -> bool:
    try:
        fh.seek(0)
        with tarfile.open(fileobj=fh, mode="r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False
    finally:
        fh.seek(0)


def decompress(data: bytes, limit: int) -> bytes:
    """Decompress a gz/bz2/xz file, reading at most ``limit + 1`` bytes (a bomb stops there)."""
    for magic, opener in OPENERS.items():
        if data.startswith(magic):
            with opener(io.BytesIO(data)) as fh:
                return fh.read(limit + 1)
    raise ValueError("not a compressed file")


def unsafe_name(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        return "unsafe path in archive (absolute or '..'); skipped"
    return ""


def too_large(size: int, limit: int) -> str:
    return f"file too large: {size} bytes > {limit} (PUPYL_MAX_IMAGE_BYTES)"


class BombGuard:
    """Stops an archive whose unpacked size passes the byte limit or the expansion-ratio limit."""

    FLOOR = 64 * 1024**2  # ratios only count past this many unpacked bytes

    def __init__(self, settings: Settings, packed: int) -> None:
        self.settings = settings
        self.packed = max(packed, 1)
        self.total = 0

    def add(self, size: int) -> str:
        self.total += size
        s = self.settings
        if self.total > s.max_archive_bytes:
            return (
                f"archive bomb guard: more than {s.max_archive_bytes} bytes unpacked "
                "(PUPYL_MAX_ARCHIVE_BYTES); archive skipped from here"
            )
        if self.total > self.FLOOR and self.total / self.packed > s.max_archive_ratio:
            return (
                f"archive bomb guard: expands more than {s.max_archive_ratio}x "
                "(PUPYL_MAX_ARCHIVE_RATIO); archive skipped from here"
            )
        return ""
