from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from pupyl_queue.sources import SourceError, expand
from tests.imagegen import encode, pattern

LIMIT = 1_000_000


def refs(uri: str | Path, limit: int = LIMIT) -> dict[str, str]:
    """ref -> "" for readable items, else the error."""
    return {Path(i.ref).name: i.error for i in expand(str(uri), limit)}


def test_directory_is_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.jpg", "sub/c.png", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    items = list(expand(str(tmp_path), LIMIT))
    assert [Path(i.ref).name for i in items] == ["a.jpg", "b.jpg", "c.png"]
    assert items[0].data == b"x"
    assert items[0].meta["original_file_name"] == "a.jpg"
    assert items[0].meta["original_path"] == str(tmp_path.resolve())


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.jpg").write_bytes(b"x")
    os.symlink(outside, root / "link.jpg")
    os.symlink(root / "in.jpg", root / "inner-link.jpg")
    found = refs(root)
    assert found["in.jpg"] == "" and found["inner-link.jpg"] == ""
    assert "leads out" in found["link.jpg"]


def test_size_limit(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    assert "too large" in refs(tmp_path, limit=10)["big.jpg"]


@pytest.mark.parametrize(
    "mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")]
)
def test_tar_archives_are_streamed(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"images{suffix}"
    jpeg = encode(pattern(1), "JPEG")
    with tarfile.open(path, mode) as tar:
        for name in ["ok/one.jpg", "../evil.jpg", "/abs.jpg"]:
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
    items = {i.ref.split("#", 1)[1]: i for i in expand(str(path), LIMIT)}
    assert items["ok/one.jpg"].data == jpeg
    assert items["ok/one.jpg"].meta["original_file_name"] == "one.jpg"
    assert "unsafe path" in items["../evil.jpg"].error
    assert "unsafe path" in items["/abs.jpg"].error


def test_damaged_archive_reports_and_stops(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        for n in range(5):
            data = encode(pattern(n), "PNG")
            info = tarfile.TarInfo(f"{n}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    items = list(expand(str(cut), LIMIT))
    assert items and "damaged" in items[-1].error


def test_glob_and_single_file(tmp_path: Path) -> None:
    for name in ["a.jpg", "b.png", "c.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(refs(str(tmp_path / "*.jpg"))) == ["a.jpg", "c.jpg"]
    assert list(refs(tmp_path / "b.png")) == ["b.png"]


@pytest.mark.parametrize(
    "uri, message",
    [("/no/such/dir", "no such file"), ("/no/*.jpg", "matches nothing"), ("ftp://x/y", "unsupported")],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        list(expand(uri, LIMIT))
