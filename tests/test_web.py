"""The HTTP service in front of real workers: uploads, search by URL, the page in Chromium, fuzzing.

The browser is Debian's ``chromium`` driven by Playwright's Python package (it runs the browser
given by path; Playwright never downloads one here). The fuzzing is a bounded schemathesis run
against the OpenAPI document: no input the document allows may produce a 5xx.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.app import make_app
from pupyl_queue import PupylQueue, Settings
from pupyl_queue.layout import Layout
from pupyl_queue.stack import free_port
from tests.httpserver import ApiClient, LoopbackServer, serve_app
from tests.imagegen import encode, pattern
from tests.logcapture import all_log_lines
from tests.workers import Workers

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BAD_FILES = {"truncated.jpg", "not_image.jpg"}
SCREENSHOT = os.environ.get("PUPYL_SCREENSHOT")  # where to save the README's picture of the page


@dataclass
class Service(ApiClient):
    client: PupylQueue
    workers: Workers
    base: str
    token: str


@pytest.fixture(scope="module")
def service(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, photo_dir: Path
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("web")
    settings = Settings(
        data_dir=home / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + "/6",
        fetch_allow_networks="127.0.0.1/32",  # the loopback test HTTP server
        allowed_roots=str(photo_dir),
        search_timeout=30,
    )
    workers = Workers(settings, home)
    workers.start()
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    client.index(photo_dir).wait(timeout=300)
    token = "web-t0ken-" + uuid.uuid4().hex
    port = free_port()
    api_settings = settings.replace(api_tokens=token, model=str(tiny_model))
    try:
        with all_log_lines() as lines, serve_app(make_app(api_settings), port):
            yield Service(client, workers, f"http://127.0.0.1:{port}", token)
    finally:
        client.close()
        workers.stop_all()
    assert lines.seen > 0 and token not in lines.text and token not in workers.logs()


def multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    for key, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_upload_index_then_search_by_url_and_path(
    service: Service, http_server: LoopbackServer, photo_dir: Path
) -> None:
    images = [encode(pattern(900 + seed), "JPEG") for seed in range(3)]
    body, kind = multipart(
        [(f"up{seed}.jpg", data) for seed, data in enumerate(images)] + [("broken.jpg", images[0][:300])],
        check_unique="true",
    )
    request = urllib.request.Request(service.base + "/v1/index", data=body, method="POST")
    request.add_header("Authorization", f"Bearer {service.token}")
    request.add_header("Content-Type", kind)
    with urllib.request.urlopen(request, timeout=60) as response:
        accepted = json.loads(response.read())
    assert response.status == 202 and accepted["files"] == 4
    state = service.wait_job(accepted["url"])
    assert (state["total"], state["indexed"], state["failed"]) == (4, 3, 1), state
    assert [f["ref"] for f in state["failures"]] == ["broken.jpg"]
    uploads = Layout().uploads(accepted["job_id"]) + "/"
    assert list(service.client.store.list(uploads)) == []  # removed once the job is done

    url = http_server.add(f"query-{uuid.uuid4().hex}.jpg", images[1], "image/jpeg")
    status, answer = service.call("POST", "/v1/search", {"uri": url, "top": 2, "metadata": True})
    assert status == 200, answer
    first = answer["results"][0]  # type: ignore[index]
    assert first["metadata"]["original_file_name"] == "up1.jpg"
    assert first["distance"] == pytest.approx(0.0, abs=1e-4)

    copy_query = {"image_b64": base64.b64encode(images[1]).decode(), "mode": "copy", "metadata": True}
    status, copied = service.call("POST", "/v1/search", copy_query)
    assert status == 200 and copied["copy"]["found"], copied  # type: ignore[index]
    assert copied["copy"]["id"] == first["id"] and copied["results"][0]["copy_score"] > 0.5  # type: ignore[index]

    photo = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name not in BAD_FILES)
    status, answer = service.call("POST", "/v1/search", {"uri": str(photo), "distances": False})
    assert status == 200, answer
    assert "distance" not in answer["results"][0]  # type: ignore[index]
    status, by_path = service.call("POST", "/v1/search", {"uri": f"file://{photo}", "metadata": True})
    assert by_path["results"][0]["metadata"]["original_file_name"] == photo.name  # type: ignore[index]

    status, refused = service.call("POST", "/v1/search", {"uri": "/etc/passwd"})
    assert status == 403 and refused["error"]["code"] == "refused"  # type: ignore[index]
    status, dead = service.call("POST", "/v1/search", {"uri": http_server.base + "/files/gone.jpg"})
    assert status == 422 and "404" in dead["error"]["message"]  # type: ignore[index]

    status, listed = service.call("GET", "/v1/jobs?limit=5")
    assert accepted["job_id"] in [j["job_id"] for j in listed["jobs"]]  # type: ignore[index]
    metrics = service.call("GET", "/metrics")[1].decode()  # type: ignore[union-attr]
    embed_runs = next(
        line
        for line in metrics.splitlines()
        if line.startswith('pupyl_task_seconds_count{task="pupyl.embed"}')
    )
    assert float(embed_runs.split()[-1]) >= 2  # the photo job's batches and the upload's


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make install-browser)")
def test_search_page_in_chromium(service: Service, photo_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name not in BAD_FILES)
    expected = service.client.search(photo, top=2, return_distances=True)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(service.base + "/")
            page.fill("#token", service.token)
            page.dispatch_event("#token", "change")
            page.set_input_files("#file", str(photo))
            page.click("#search-file button")
            page.wait_for_selector("#results li img[src^='blob:']")
            cards = page.locator("#results li")
            assert cards.first.get_attribute("data-id") == str(expected[0][0])
            assert "distance 0.0000" in cards.first.inner_text()
            assert photo.name in cards.first.inner_text()  # metadata shown
            assert page.inner_text("#query-shown span") == f"File {photo.name}"  # what the results answer
            assert page.locator("#jobs tbody tr").count() >= 1  # recent jobs, with progress bars
            assert page.locator("#jobs progress").count() >= 1

            other = cards.nth(1).get_attribute("data-id")
            cards.nth(1).locator("img").click()  # search by a result
            page.wait_for_function(
                "id => document.querySelector('#results li')?.dataset.id === id", arg=other
            )
            assert "distance 0.0000" in page.locator("#results li").first.inner_text()
            assert page.inner_text("#query-shown span") == f"Indexed image {other}"  # not the old file
            page.wait_for_selector("#results li img[src^='blob:']")

            # the filter box: k=v pairs narrow the ranking; a bad filter says why and sends nothing
            page.fill("#filter", "format=NOPE")
            page.click("#search-file button")
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.startsWith('0 results')"
            )
            assert page.inner_text("#query-shown span") == f"File {photo.name} · where format=NOPE"
            page.fill("#filter", '{"width": ')
            page.click("#search-file button")
            page.wait_for_selector("#status.error")
            assert "Bad filter" in page.inner_text("#status")
            page.fill("#filter", "")

            page.check("#copy-mode")  # "find the original": the photo itself is its own original
            page.click("#search-file button")
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('original')")
            assert f"its original: image {expected[0][0]}" in page.inner_text("#status")
            assert page.locator("#results li.original").get_attribute("data-id") == str(expected[0][0])
            page.uncheck("#copy-mode")
            if SCREENSHOT:
                page.screenshot(path=SCREENSHOT, full_page=True)

            # a keyed copy of the photo (last: it ties with the photo at distance 0): key and attributes
            keyed = service.client.upsert(photo, key="page-key", attributes={"shelf": "top"})
            assert keyed["status"] == "indexed", keyed
            page.click("#search-file button")
            card = page.locator("#results li[data-key='page-key']")
            card.wait_for()
            assert "page-key" in card.locator("dd.key").inner_text()
            assert card.locator("dt.attribute").inner_text() == "shelf" and "top" in card.inner_text()

            page.fill("#token", "wrong")
            page.dispatch_event("#token", "change")
            page.click("#search-file button")
            page.wait_for_selector("#status.error")
            assert "401" in page.inner_text("#status")
        finally:
            browser.close()
    problems = [p for p in problems if "401" not in p]  # the refused search above logs its 401
    assert problems == []


# --- callers' keys and attributes over HTTP (issue 17)
def ended(service: ApiClient, url: str, timeout: float = 180) -> dict[str, object]:
    """A job's view once it has ended (done, partial or failed)."""
    deadline = time.monotonic() + timeout
    while (state := service.call("GET", url)[1])["state"] not in ("done", "partial", "failed"):  # type: ignore[index]
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    return state  # type: ignore[no-any-return]


def keyed_multipart(parts: list[tuple[str, str, bytes | str]]) -> tuple[bytes, str]:
    """A multipart body with its parts in this order: (field name, file name or '', content)."""
    boundary = uuid.uuid4().hex
    out = []
    for name, filename, content in parts:
        data = content.encode() if isinstance(content, str) else content
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_keys_attributes_and_filters_over_http(service: Service, photo_dir: Path) -> None:
    images = [encode(pattern(700 + seed), "JPEG") for seed in range(3)]
    where = "?collection=keyed-http"
    body, kind = keyed_multipart(
        [
            ("collection", "", "keyed-http"),
            ("files", "k0.jpg", images[0]),
            ("key", "", "web/0"),  # a key with a slash: percent-encoded in the /v1/keys routes
            ("attributes", "", '{"color": "red", "n": 0}'),
            ("files", "k1.jpg", images[1]),
            ("attributes", "", '{"color": "blue"}'),
            ("key", "", "web-1"),
            ("files", "k2.jpg", images[2]),
            ("key", "", "web-2"),
            ("attributes", "", "not json"),  # this file fails alone, with the reason
        ]
    )
    status, accepted = service.call("POST", "/v1/index", raw=body, content_type=kind)
    assert status == 202 and accepted["files"] == 3, accepted  # type: ignore[index]
    state = ended(service, accepted["url"])  # type: ignore[index]
    assert (state["total"], state["indexed"], state["failed"]) == (3, 2, 1), state
    assert [(f["ref"], f["error"]) for f in state["failures"]] == [  # type: ignore[attr-defined]
        ("k2.jpg", "attributes are not valid JSON")
    ]
    body, kind = keyed_multipart([("key", "", "early"), ("files", "a.jpg", images[0])])
    status, misplaced = service.call("POST", "/v1/index", raw=body, content_type=kind)
    assert status == 400 and "follows the file" in misplaced["error"]["message"]  # type: ignore[index]

    photo = next(p for p in sorted(photo_dir.rglob("*.jpg")) if p.name not in BAD_FILES)
    items = [
        {"uri": str(photo), "key": "web-3", "attributes": {"color": "red", "n": 3}},
        {"uri": "/etc/hostname", "key": "web-4"},  # outside PUPYL_ALLOWED_ROOTS: that row fails
        {"uri": str(photo), "key": ""},  # a bad key: that row fails
        {"uri": str(photo), "key": "web-5", "attributes": {"id": 1}},  # a reserved name
    ]
    status, accepted = service.call("POST", "/v1/index", {"collection": "keyed-http", "items": items})
    assert status == 202 and accepted["items"] == 4, accepted  # type: ignore[index]
    state = ended(service, accepted["url"])  # type: ignore[index]
    assert (state["indexed"], state["failed"]) == (1, 3), state
    reasons = " | ".join(f["error"] for f in state["failures"])  # type: ignore[attr-defined]
    assert "allowed roots" in reasons and "a key is a non-empty string" in reasons, reasons
    assert "reserved" in reasons and "items:2" in reasons, reasons
    for bad in ({"items": []}, {"items": "x"}, {"items": [{}] * 1001}, {"items": [], "uri": "/x"}):
        status, error = service.call("POST", "/v1/index", bad)
        assert status == 400 and error["error"]["code"] == "bad_request", (bad, error)  # type: ignore[index]

    query = {"collection": "keyed-http", "image_b64": base64.b64encode(images[0]).decode(), "top": 10}
    status, red = service.call("POST", "/v1/search", {**query, "filter": {"color": "red"}, "metadata": True})
    assert status == 200, red
    hits = red["results"]  # type: ignore[index]
    assert [h["key"] for h in hits] == ["web/0", "web-3"] and hits[0]["distance"] < 1e-4, hits
    assert hits[0]["metadata"]["attributes"] == {"color": "red", "n": 0}
    body, kind = keyed_multipart(
        [("image", "q.jpg", images[0]), ("collection", "", "keyed-http"), ("filter", "", '{"color": "blue"}')]
    )
    status, blue = service.call("POST", "/v1/search", raw=body, content_type=kind)
    assert status == 200 and [h["key"] for h in blue["results"]] == ["web-1"], blue  # type: ignore[index]
    in_query = urllib.parse.quote(json.dumps({"n": {"gte": 1}}))
    status, ranged = service.call("POST", f"/v1/search?filter={in_query}", query)
    assert status == 200 and [h["key"] for h in ranged["results"]] == ["web-3"], ranged  # type: ignore[index]
    for bad_filter in ({"filter": {"color": {"near": 1}}}, {"filter": "{"}, {"filter": []}, {"filter": 5}):
        status, error = service.call("POST", "/v1/search", {**query, **bad_filter})
        assert status == 400 and error["error"]["code"] == "bad_filter", (bad_filter, error)  # type: ignore[index]
    status, error = service.call("POST", "/v1/search?filter=%7B", query)
    assert status == 400 and error["error"]["code"] == "bad_filter"  # type: ignore[index]

    status, found = service.call("GET", f"/v1/keys/web%2F0{where}")
    assert status == 200 and found["key"] == "web/0" and found["id"] == hits[0]["id"], found  # type: ignore[index]
    assert service.call("GET", f"/v1/keys/nobody{where}")[0] == 404
    assert service.call("GET", f"/v1/keys/{'k' * 300}{where}")[0] == 400
    assert service.call("GET", f"/v1/keys/a%0Ab{where}")[0] == 400  # a control character
    status, updated = service.call(
        "PUT", f"/v1/keys/web%2F0/attributes{where}", {"attributes": {"color": "green"}}
    )
    assert status == 200 and updated["updated"] and updated["replaced"] == found["id"], updated  # type: ignore[index]
    status, green = service.call("POST", "/v1/search", {**query, "filter": {"color": "green"}})
    assert [(h["id"], h["key"], h["distance"] < 1e-4) for h in green["results"]] == [  # type: ignore[index]
        (updated["id"], "web/0", True)  # type: ignore[index]
    ]
    for bad_body in ({"attributes": {"id": 3}}, {"attributes": "x"}, {"colour": "red"}, {}):
        status, error = service.call("PUT", f"/v1/keys/web%2F0/attributes{where}", bad_body)
        assert status == 400, (bad_body, error)
    status, _ = service.call("PUT", f"/v1/keys/nobody/attributes{where}", {"attributes": {"a": 1}})
    assert status == 404
    status, removed = service.call("DELETE", f"/v1/keys/web%2F0{where}")
    assert status == 200 and removed["removed"] and removed["id"] == updated["id"], removed  # type: ignore[index]
    assert service.call("DELETE", f"/v1/keys/web%2F0{where}")[0] == 404
    assert service.call("GET", f"/v1/keys/web%2F0{where}")[0] == 404


def readme_block(name: str) -> str:
    """The fenced block after ``<!-- roundtrip:<name> -->`` in the README."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    found = re.search(rf"<!-- roundtrip:{name} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert found, name
    return found[1]


def commands(block: str, program: str) -> list[str]:
    """The block's command lines (continuations joined) that start with ``program``."""
    joined = block.replace("\\\n", "")  # as bash reads it
    return [line for line in joined.splitlines() if line.startswith(program)]


def test_the_readme_round_trip_runs_as_written(
    service: Service, http_server: LoopbackServer, tmp_path: Path, tiny_model: Path
) -> None:
    """The README's client, CLI and curl blocks, each command as it stands there, on one catalogue."""
    shop = tmp_path / "shop"
    for sub, name, seed in (
        ("shoes", "red", 1),
        ("shoes", "blue", 2),
        ("shoes", "gold", 3),
        ("bags", "brown", 4),
    ):
        (shop / sub).mkdir(parents=True, exist_ok=True)
        (shop / sub / f"{name}.jpg").write_bytes(encode(pattern(800 + seed), "JPEG"))
    (shop / "query.jpg").write_bytes((shop / "shoes" / "red.jpg").read_bytes())
    csv = re.search(
        r"`catalog.csv`\n\n```csv\n(.*?)\n```", (Path(__file__).parent.parent / "README.md").read_text(), re.S
    )
    assert csv
    (shop / "catalog.csv").write_text(csv[1] + "\n")
    settings = service.client.settings
    root = Path(__file__).parent.parent
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pupyl-queue").write_text(f'#!/bin/sh\nexec {sys.executable} -m pupyl_queue.cli "$@"\n')
    (bin_dir / "pupyl-queue").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUPYL_")}
    env.update(PUPYL_REDIS_URL=settings.redis_url, PUPYL_DATA_DIR=str(settings.data_dir))
    env.update(PUPYL_MODEL=str(tiny_model), PYTHONPATH=str(root), PATH=f"{bin_dir}:{env['PATH']}")

    def sh(line: str, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", line], cwd=shop, env={**env, **extra}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, (line, done.stdout, done.stderr)
        return done

    python = subprocess.run(
        [sys.executable, "-c", readme_block("python")],
        cwd=shop,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert python.returncode == 0, python.stderr
    assert python.stdout.split("\n")[:4] == ["4", "['sku-1', 'sku-2']", "True", "True"], python.stdout

    cli = [sh(line) for line in commands(readme_block("cli"), "pupyl-queue")]
    assert len(cli) == 6
    ranked = cli[1].stdout.splitlines()
    assert [line.split("key ")[1] for line in ranked] == ["sku-1", "sku-2"], ranked
    assert json.loads(cli[2].stdout)["status"] == "unchanged"  # the same bytes under the same key
    assert json.loads(cli[3].stdout)["updated"] is True
    assert json.loads(cli[4].stdout)["id"] == json.loads(cli[3].stdout)["id"]
    assert json.loads(cli[5].stdout)["removed"] is True

    http_server.add("blue.jpg", (shop / "shoes" / "blue.jpg").read_bytes(), "image/jpeg")
    answers = []
    for line in commands(readme_block("curl"), "curl"):
        urls = {"TOKEN": service.token, "API": service.base, "IMAGES": http_server.base + "/files"}
        answer = json.loads(sh(line, **urls).stdout)
        assert "error" not in answer, (line, answer)
        if "job_id" in answer:
            state = ended(service, answer["url"])
            assert state["state"] == "done" and not state["failed"], state["failures"]
        answers.append(answer)
    assert len(answers) == 6
    assert [hit["key"] for hit in answers[2]["results"]] == ["sku-1", "sku-2"], answers[2]
    assert answers[2]["results"][0]["distance"] < 1e-4
    assert answers[3]["updated"] is True and answers[4]["id"] == answers[3]["id"]
    assert answers[5]["removed"] is True and answers[5]["key"] == "sku-2"


def fuzz(service: Service, tmp_path: Path, methods: list[str]) -> int:
    """A bounded schemathesis run (fixed seed, 8 examples per operation); the number of cases, all free
    of 5xx."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", service.base + "/v1/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "8", "--seed", "7",
        "--request-timeout", "60", "--header", f"Authorization: Bearer {service.token}",
        *methods, "--workers", "1", "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated and int(generated[2]) == int(generated[1]), output[-3000:]
    return int(generated[1])


def test_bounded_fuzzing_finds_no_server_error(service: Service, tmp_path: Path) -> None:
    """Every operation but DELETE, which could remove what the other tests of this module use."""
    assert fuzz(service, tmp_path, ["--exclude-method", "DELETE"]) > 100  # bounded, not empty


def test_bounded_fuzzing_of_deletes_finds_no_server_error(service: Service, tmp_path: Path) -> None:
    """The DELETE operations, last in this module (pytest keeps file order): they may remove its data."""
    assert fuzz(service, tmp_path, ["--include-method", "DELETE"]) >= 8
