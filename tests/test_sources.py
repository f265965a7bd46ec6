"""Every source and every bad-input case of expansion, against real files and a real HTTP server."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from pupyl_queue.settings import Settings
from pupyl_queue.sources import SourceError, SourceItem, Sources, fetch_pending, sniff
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.httpserver import LoopbackServer
from tests.imagegen import encode, pattern

JPEG = encode(pattern(1), "JPEG")
PNG = encode(pattern(2), "PNG")


def settings(**changes: object) -> Settings:
    base = dict(
        max_image_bytes=1_000_000,
        fetch_allow_networks="127.0.0.1/32",
        fetch_retries=2,
        fetch_read_timeout=1.0,
        fetch_connect_timeout=1.0,
    )
    base.update(changes)
    return Settings(**base)  # type: ignore[arg-type]


def expand(uri: str | Path, origin: str = "local", **changes: object) -> list[SourceItem]:
    sources = Sources(settings(**changes), origin=origin)
    return list(fetch_pending(sources.expand(str(uri)), sources.fetcher, 1_000_000, window=8))


def outcome(items: list[SourceItem]) -> dict[str, str]:
    """name -> "ok" or the error, for short assertions."""
    return {i.ref.rsplit("#", 1)[-1].rsplit("/", 1)[-1]: (i.error or "ok") for i in items}


def tar_of(members: dict[str, bytes], mode: str = "w:gz", links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind_target) in (links or {}).items():
            kind, target = kind_target.split(":", 1)
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            tar.addfile(info)
    return out.getvalue()


def zip_of(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return out.getvalue()


# --- local folders and files
def test_directory_is_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.jpg", "sub/c.png", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(JPEG)
    items = expand(tmp_path)
    assert [Path(i.ref).name for i in items] == ["a.jpg", "b.jpg", "c.png"]
    assert items[0].data == JPEG
    assert items[0].meta["original_file_name"] == "a.jpg"
    assert items[0].meta["original_path"] == str(tmp_path.resolve())


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(JPEG)
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.jpg").write_bytes(JPEG)
    os.symlink(outside, root / "link.jpg")
    os.symlink(root / "in.jpg", root / "inner-link.jpg")
    found = outcome(expand(root))
    assert found["in.jpg"] == "ok" and found["inner-link.jpg"] == "ok"
    assert "leads out" in found["link.jpg"]


def test_size_limit(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(JPEG)
    assert "too large" in outcome(expand(tmp_path, max_image_bytes=100))["big.jpg"]


def test_glob_and_single_file(tmp_path: Path) -> None:
    for name in ["a.jpg", "b.png", "c.jpg"]:
        (tmp_path / name).write_bytes(JPEG)
    assert sorted(outcome(expand(tmp_path / "*.jpg"))) == ["a.jpg", "c.jpg"]
    assert list(outcome(expand(tmp_path / "b.png"))) == ["b.png"]


@pytest.mark.parametrize(
    "uri, message",
    [("/no/such/dir", "no such file"), ("/no/*.jpg", "matches nothing"), ("ftp://x/y", "unsupported URI")],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        expand(uri)


def test_network_requests_stay_in_allowed_roots(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.jpg").write_bytes(JPEG)
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        expand(tmp_path, origin="network")
    with pytest.raises(SourceError, match="outside the allowed roots"):
        expand(tmp_path / "secret.jpg", origin="network", allowed_roots=str(allowed))
    assert outcome(expand(allowed, origin="network", allowed_roots=str(allowed))) == {"a.jpg": "ok"}
    lst = allowed / "list.txt"
    lst.write_text(f"a.jpg\n{tmp_path / 'secret.jpg'}\n")
    found = outcome(expand(lst, origin="network", allowed_roots=str(allowed)))
    assert found["a.jpg"] == "ok" and "outside the allowed roots" in found["secret.jpg"]


def test_roots_are_folders_not_name_prefixes_and_are_resolved(tmp_path: Path) -> None:
    """The roots are resolved once per job and compared as strings: a sibling whose name extends a
    root's stays out, a root named through a link admits what it leads to, and "/" admits all."""
    allowed, sibling = tmp_path / "photos", tmp_path / "photos-private"
    for folder in (allowed, sibling):
        folder.mkdir()
        (folder / "a.jpg").write_bytes(JPEG)
    (tmp_path / "via").symlink_to(allowed)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        expand(sibling, origin="network", allowed_roots=str(allowed))
    sources = Sources(settings(allowed_roots=str(tmp_path / "via")), origin="network", references=True)
    (item,) = sources.expand(str(allowed))
    # by reference: the path the embed worker opens again, and the folder's resolved path in the metadata
    assert item.path == str((allowed / "a.jpg").resolve()) and item.data is None
    assert item.meta["original_path"] == str(allowed.resolve())
    (item,) = sources.expand(str(tmp_path / "via"))  # the folder named through the link
    assert item.path == str((allowed / "a.jpg").resolve())
    assert "outside the allowed roots" in sources.local_path_error(sibling / "a.jpg")
    assert sources.local_path_error(allowed) == ""  # the root itself
    assert outcome(expand(sibling, origin="network", allowed_roots="/")) == {"a.jpg": "ok"}


# --- archives
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_archives(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "images.archive"  # the name says nothing: content is sniffed
    path.write_bytes(tar_of({"ok/one.jpg": JPEG, "two.png": PNG}, mode))
    items = expand(path)
    assert outcome(items) == {"one.jpg": "ok", "two.png": "ok"}
    assert items[0].data == JPEG
    assert items[0].meta["original_file_name"] == "one.jpg"


def test_zip_archive(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(zip_of({"a/one.jpg": JPEG, "two.png": PNG, "../evil.jpg": JPEG}, symlinks=("link.jpg",)))
    found = outcome(expand(path))
    assert found["one.jpg"] == found["two.png"] == "ok"
    assert "unsafe path" in found["evil.jpg"] and "link in archive" in found["link.jpg"]


def test_unsafe_members_and_links(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    path.write_bytes(
        tar_of(
            {"../evil.jpg": JPEG, "/abs.jpg": JPEG, "fine.jpg": JPEG},
            "w",
            links={"sym.jpg": "sym:/etc/passwd", "hard.jpg": "hard:fine.jpg"},
        )
    )
    found = outcome(expand(path))
    assert found["fine.jpg"] == "ok"
    assert "unsafe path" in found["evil.jpg"] and "unsafe path" in found["abs.jpg"]
    assert "link in archive" in found["sym.jpg"] and "link in archive" in found["hard.jpg"]


def test_nested_archives_up_to_a_depth(tmp_path: Path) -> None:
    inner = tar_of({"deep.jpg": JPEG})
    middle = zip_of({"inner.tar.gz": inner, "mid.jpg": JPEG})
    path = tmp_path / "outer.tar"
    path.write_bytes(tar_of({"middle.zip": middle, "top.jpg": JPEG}, "w"))
    assert outcome(expand(path, max_archive_depth=3)) == {"deep.jpg": "ok", "mid.jpg": "ok", "top.jpg": "ok"}
    found = outcome(expand(path, max_archive_depth=1))
    assert found["top.jpg"] == "ok" and "nested archive deeper than 1" in found["middle.zip"]


def test_archive_bomb_by_size_and_by_ratio(tmp_path: Path) -> None:
    zeros = bytes(8 * 1024 * 1024)
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(tar_of({f"{n}.jpg": zeros for n in range(10)}))
    assert path.stat().st_size < 200_000  # 80 MB of zeros, packed
    found = outcome(expand(path, max_image_bytes=10 * 1024 * 1024, max_archive_bytes=20 * 1024 * 1024))
    assert "archive bomb guard: more than" in found["2.jpg"] and "3.jpg" not in found
    ratio = outcome(expand(path, max_image_bytes=10 * 1024 * 1024, max_archive_ratio=50))
    assert any("expands more than 50x" in error for error in ratio.values())


def test_damaged_archive_reports_and_stops(tmp_path: Path) -> None:
    good = tar_of({f"{n}.png": encode(pattern(n), "PNG") for n in range(5)})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good[: len(good) // 2])
    items = expand(cut)
    assert items and "damaged" in items[-1].error


# --- lists
@pytest.mark.parametrize("pack", ["plain", "gz", "bz2", "xz", "zip"])
def test_lists_local_and_compressed(tmp_path: Path, http_server: LoopbackServer, pack: str) -> None:
    (tmp_path / "local.jpg").write_bytes(JPEG)
    url = http_server.add(f"list-{pack}.jpg", PNG, "image/png")
    text = f"path,label\nlocal.jpg,cat\n{url},dog\nnot a reference\n\n# a comment\n".encode()
    packed = {
        "plain": lambda d: d,
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lzma.compress,
        "zip": lambda d: zip_of({"refs.csv": d}),
    }[pack](text)
    path = tmp_path / "refs.bin"
    path.write_bytes(packed)
    items = expand(path)
    found = {i.ref.rsplit("/", 1)[-1]: i for i in items}
    assert found["local.jpg"].data == JPEG
    assert found[f"list-{pack}.jpg"].data == PNG
    assert found[f"list-{pack}.jpg"].meta["original_file_name"] == f"list-{pack}.jpg"
    assert "1 columns where the header has 2" in found["not a reference"].error  # "label" is an attribute
    assert found["local.jpg"].attributes == {"label": "cat"}
    assert len(items) == 3  # the header and the comment are not items


# --- remote
def test_single_image_url(http_server: LoopbackServer) -> None:
    url = http_server.add("single.jpg", JPEG, "image/jpeg")
    (item,) = expand(url)
    assert item.data == JPEG and item.ref == url


def test_remote_archives_and_lists(http_server: LoopbackServer, tmp_path: Path) -> None:
    tar_url = http_server.add("images.tgz", tar_of({"r1.jpg": JPEG, "r2.png": PNG}))
    zip_url = http_server.add("images.zip", zip_of({"z1.jpg": JPEG}))
    assert outcome(expand(tar_url)) == {"r1.jpg": "ok", "r2.png": "ok"}
    assert outcome(expand(zip_url)) == {"z1.jpg": "ok"}
    img = http_server.add("listed.jpg", JPEG, "image/jpeg")
    list_url = http_server.add("refs.txt.gz", gzip.compress(f"{img}\n/etc/passwd\n".encode()))
    found = outcome(expand(list_url))
    assert found["listed.jpg"] == "ok" and "local path in a remote list" in found["passwd"]


def test_flaky_server_is_retried(http_server: LoopbackServer) -> None:
    url = http_server.add("flaky.jpg", JPEG, "image/jpeg")
    http_server.fail_first["flaky.jpg"] = 2
    list_url = http_server.add("flaky-list.txt", f"{url}\n".encode(), "text/plain")
    (item,) = expand(list_url, fetch_retries=3)
    assert item.data == JPEG and item.meta["fetch_attempts"] == 3


def test_bad_remote_references(http_server: LoopbackServer) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/x.jpg"
    html = http_server.add("page.jpg", b"<!DOCTYPE html><html><body>hi</body></html>", "image/jpeg")
    refs = {
        "dead": dead,
        "missing": f"{http_server.base}/files/none.jpg",
        "hangs": f"{http_server.base}/slow?seconds=4",
        "to-private": f"{http_server.base}/redirect?to=http://169.254.169.254/latest/meta-data",
        "to-ten": f"{http_server.base}/redirect?to=http://10.1.2.3/x.jpg",
        "loops": f"{http_server.base}/loop",
        "scheme": f"{http_server.base}/redirect?to=file:///etc/passwd",
        "html": html,
    }
    listing = "\n".join(refs.values()) + "\n"
    list_url = http_server.add("bad-refs.txt", listing.encode(), "text/plain")
    started = time.monotonic()
    items = {i.ref: i for i in expand(list_url, fetch_retries=1)}
    assert time.monotonic() - started < 15  # the hanging URL timed out instead of blocking the job
    error = {name: items[url].error for name, url in refs.items()}
    assert "cannot connect" in error["dead"]
    assert "HTTP 404" in error["missing"]
    assert "timed out" in error["hangs"]
    assert "refused: 169.254.169.254" in error["to-private"]
    assert "refused: 10.1.2.3" in error["to-ten"]
    assert "too many redirects" in error["loops"]
    assert "only http and https" in error["scheme"]
    assert error["html"] == "" and sniff(items[html].data or b"") == "html"  # decode rejects it later


def test_html_page_as_uri_is_a_clear_error(http_server: LoopbackServer) -> None:
    url = http_server.add("index.html", b"<html><body>not images</body></html>", "text/html")
    with pytest.raises(SourceError, match="HTML page"):
        expand(url)


def test_ssrf_guard_on_by_default(http_server: LoopbackServer) -> None:
    url = http_server.add("guarded.jpg", JPEG, "image/jpeg")
    with pytest.raises(SourceError, match="refused: 127.0.0.1 is a private or local address"):
        expand(url, fetch_allow_networks="")
    by_name = url.replace("127.0.0.1", "localhost")
    with pytest.raises(SourceError, match="refused: localhost resolves to a private or local address"):
        expand(by_name, fetch_allow_networks="")


def test_dead_top_level_url() -> None:
    with pytest.raises(SourceError, match="cannot fetch .*cannot connect"):
        expand(f"http://127.0.0.1:{_closed_port()}/images.tar", fetch_retries=0)


# --- S3
def test_s3_prefix(s3_endpoint: str) -> None:
    from pupyl_queue.store import S3Store

    bucket = f"src-{uuid.uuid4().hex[:8]}"
    source = S3Store(bucket, "", s3_endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)
    source.put("photos/a.jpg", JPEG)
    source.put("photos/sub/b.png", PNG)
    source.put("other/c.jpg", JPEG)
    s3 = dict(
        s3_endpoint=s3_endpoint, s3_access_key=S3_ACCESS_KEY, s3_secret_key=S3_SECRET_KEY, s3_secure=False
    )
    items = expand(f"s3://{bucket}/photos/", **s3)
    assert [i.ref for i in items] == [f"s3://{bucket}/photos/a.jpg", f"s3://{bucket}/photos/sub/b.png"]
    assert items[1].data == PNG and items[1].meta["original_file_name"] == "b.png"
    assert expand(f"s3://{bucket}/nothing-here/", **s3) == []


def test_s3_references_name_the_objects_and_their_reader_checks_them_again(s3_endpoint: str) -> None:
    """PUPYL_S3_REFERENCES: the listing yields names and sizes, no bytes (the embed worker reads
    them); a listed object over the limit fails at once. The reader reads at most the limit + 1 bytes
    again (an object may grow after its listing) and fails one item for what is that item's alone;
    an unreachable server is the store's error, which retries the batch."""
    from pupyl_queue.sources import ObjectRefused
    from pupyl_queue.store import S3Store, StoreUnavailable

    bucket = f"refs-{uuid.uuid4().hex[:8]}"
    source = S3Store(bucket, "", s3_endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)
    source.put("photos/a.jpg", JPEG)
    source.put("photos/big.png", PNG)
    s3 = dict(
        s3_endpoint=s3_endpoint, s3_access_key=S3_ACCESS_KEY, s3_secret_key=S3_SECRET_KEY, s3_secure=False
    )
    limit = len(JPEG) + 100
    assert len(PNG) > limit
    sources = Sources(settings(max_image_bytes=limit, **s3), origin="network", s3_references=True)
    items = list(sources.expand(f"s3://{bucket}/photos/"))
    a, big = items
    assert (a.ref, a.s3, a.data, a.error) == (f"s3://{bucket}/photos/a.jpg", a.ref, None, "")
    assert a.meta == {
        "original_file_name": "a.jpg",
        "original_path": f"s3://{bucket}/photos",
        "original_file_size": len(JPEG),
    }
    assert (big.s3, big.data) == ("", None) and "too large" in big.error
    assert sources.read_reference(a.s3) == JPEG

    source.put("photos/a.jpg", JPEG + b"\0" * (limit + 1 - len(JPEG)))  # grew after its listing
    with pytest.raises(ObjectRefused, match="too large"):
        sources.read_object(a.s3)
    source.delete("photos/a.jpg")
    with pytest.raises(ObjectRefused, match="no such object"):
        sources.read_object(a.s3)
    dead = dict(s3, s3_endpoint=f"127.0.0.1:{_closed_port()}")
    with pytest.raises(StoreUnavailable):
        Sources(settings(**dead), s3_references=True).read_object(f"s3://{bucket}/photos/a.jpg")
    # A bucket that is not there: the listing and a reference fail, and neither makes it.
    nowhere = f"nowhere-{uuid.uuid4().hex[:8]}"
    with pytest.raises(SourceError, match="cannot list"):
        list(sources.expand(f"s3://{nowhere}/photos/"))
    with pytest.raises(ObjectRefused, match="cannot fetch"):
        sources.read_object(f"s3://{nowhere}/photos/a.jpg")
    assert not source._client.bucket_exists(nowhere)
    # Without references, the ingest reads the objects itself (embed workers without the buckets).
    source.put("photos/a.jpg", JPEG)
    by_bytes = Sources(settings(max_image_bytes=limit, **s3), origin="network").expand(
        f"s3://{bucket}/photos/"
    )
    assert next(iter(by_bytes)).data == JPEG


def _closed_port() -> int:
    from pupyl_queue.stack import free_port

    return free_port()
