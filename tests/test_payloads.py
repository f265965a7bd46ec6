"""Task payloads: docs/tasks.md's JSON examples and what the producers really build, against the
TypedDicts of pupyl_queue/payloads.py.

The producers' payloads are built in-process by the functions that build them for the send calls
(PupylQueue.*_request, ingest.expand_job with a dispatch that keeps its batches, sharding.shard_request,
queries.nearest_request), against a real Redis and a real local store: no Celery in between.
"""

from __future__ import annotations

import json
import re
import types
import typing
import uuid
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pytest
import redis

from pupyl_queue import constants as C
from pupyl_queue import payloads as P
from pupyl_queue.client import PupylQueue
from pupyl_queue.ingest import expand_job
from pupyl_queue.layout import Layout
from pupyl_queue.queries import nearest_request
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.sharding import shard_request
from tests.imagegen import encode, pattern

ROOT = Path(__file__).resolve().parents[1]
TASKS_MD = ROOT / "docs" / "tasks.md"

# task -> (its kwargs' type, its result's type); None: the docs show no such example.
CONTRACTS: dict[str, tuple[Any, Any]] = {
    C.TASK_INDEX: (P.IndexRequest, P.IndexResult),
    C.TASK_EMBED: (P.EmbedRequest, P.EmbedResult),
    C.TASK_SEARCH: (P.SearchRequest, P.SearchResult),
    C.TASK_SEARCH_SHARD: (P.ShardRequest, P.ShardSearchResult | P.ShardVectorResult),
    C.TASK_NEAREST: (P.NearestRequest, P.NearestResult),
    C.TASK_REMOVE: (P.RemoveRequest, P.RemoveResult),
    C.TASK_SET_ATTRIBUTES: (P.SetAttributesRequest, P.SetAttributesResult),
    C.TASK_COMPACT: (P.CompactRequest, None),
    C.TASK_HOUSEKEEP: (None, P.HousekeepResult),
}


SCALARS: dict[Any, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # JSON writes 0.0 as 0 too
    str: lambda v: isinstance(v, str),
}


# --- a small runtime checker: the subset of typing payloads.py uses; anything else is an error
def violations(value: Any, tp: Any, where: str = "$") -> list[str]:
    """Why ``value`` (parsed JSON) is not a ``tp``; empty when it is."""
    if tp is Any:
        return []
    if tp is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if typing.is_typeddict(tp):
        return _typeddict_violations(value, tp, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        tries = [violations(value, alt, where) for alt in args]
        if any(not errors for errors in tries):
            return []
        return [f"{where}: matches none of {[getattr(a, '__name__', a) for a in args]}", *min(tries, key=len)]
    if origin is Literal:
        return [] if value in args else [f"{where}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__} is not a list"]
        return [e for n, item in enumerate(value) for e in violations(item, args[0], f"{where}[{n}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__} is not an object"]
        return [
            e
            for k, v in value.items()
            for e in violations(k, args[0], where) + violations(v, args[1], f"{where}.{k}")
        ]
    if tp in SCALARS:
        return [] if SCALARS[tp](value) else [f"{where}: {value!r} is not a {tp.__name__}"]
    raise TypeError(f"the checker does not know {tp!r} ({where})")


def _typeddict_violations(value: Any, tp: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {type(value).__name__} is not an object ({tp.__name__})"]
    hints = typing.get_type_hints(tp)
    errors = [
        f"{where}: {tp.__name__} lacks required {key!r}" for key in sorted(tp.__required_keys__ - set(value))
    ]
    errors += [f"{where}: {tp.__name__} has no key {key!r}" for key in sorted(set(value) - set(hints))]
    for key in sorted(set(value) & set(hints)):
        errors += violations(value[key], hints[key], f"{where}.{key}")
    return errors


def test_the_checker_can_fail() -> None:
    """The checks below mean something only if the checker refuses what it should."""
    good: P.SearchRequest = {"collection": "default", "query": {"id": 3}, "top": 4}
    assert violations(good, P.SearchRequest) == []
    assert any("lacks required 'collection'" in e for e in violations({"query": {"id": 3}}, P.SearchRequest))
    assert any("no key 'topk'" in e for e in violations({**good, "topk": 4}, P.SearchRequest))
    assert violations({**good, "query": {"id": 3, "vector": [1.0]}}, P.SearchRequest)  # two kinds at once
    assert violations({**good, "top": "4"}, P.SearchRequest)
    assert violations({**good, "mode": "fuzzy"}, P.SearchRequest)
    item = {"ref": "a.jpg", "data_b64": "", "key": "staging/0"}  # inline and staged at once
    assert violations(item, P.EmbedItem)
    assert violations({"ref": "a.jpg"}, P.EmbedItem)  # no bytes and no error


# --- docs/tasks.md
def doc_examples() -> list[tuple[str, str, str, Any]]:
    """(task, "request" or "result", the block's text, its JSON) for every ```json block under a
    ``## `pupyl.<task>` `` heading. A block right after a line that says ``Result`` is a result."""
    found = []
    task = None
    lines = TASKS_MD.read_text().splitlines()
    n = 0
    while n < len(lines):
        line = lines[n]
        heading = re.fullmatch(r"## `(pupyl\.[a-z_]+)`", line.strip())
        if line.startswith("## "):
            task = heading.group(1) if heading else None
        elif line.strip() == "```json" and task is not None:
            end = lines.index("```", n + 1)
            text = "\n".join(lines[n + 1 : end])
            kind = "result" if "Result" in lines[n - 1] else "request"
            found.append((task, kind, text, json.loads(text)))
            n = end
        n += 1
    return found


EXAMPLES = doc_examples()


def test_every_task_section_has_a_contract_and_examples() -> None:
    headings = set(re.findall(r"^## `(pupyl\.[a-z_]+)`", TASKS_MD.read_text(), re.MULTILINE))
    assert set(CONTRACTS) <= headings
    for task, (request_type, result_type) in CONTRACTS.items():
        kinds = {kind for t, kind, _, _ in EXAMPLES if t == task}
        assert ("request" in kinds) == (request_type is not None), task
        assert ("result" in kinds) == (result_type is not None), task


@pytest.mark.parametrize(
    ("task", "kind", "text", "example"),
    EXAMPLES,
    ids=[f"{t}-{k}-{n}" for n, (t, k, _, _) in enumerate(EXAMPLES)],
)
def test_a_docs_example_matches_its_typeddict(task: str, kind: str, text: str, example: Any) -> None:
    request_type, result_type = CONTRACTS[task]
    assert violations(example, request_type if kind == "request" else result_type) == [], text


# --- what the producers send
@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> PupylQueue:
    # Nothing here connects: the *_request methods only build (a large query image goes to the store).
    return PupylQueue(settings=Settings(data_dir=tmp_path / "data", redis_url=redis_url, inline_limit=1000))


def test_the_clients_requests_match(client: PupylQueue) -> None:
    vector = np.linspace(0.1, 1.0, 8, dtype=np.float32)
    small, large = encode(pattern(1, (16, 16)), "PNG"), encode(pattern(2), "PNG")
    assert len(small) <= 1000 < len(large)
    searches = [
        client.search_request(12),
        client.search_request(vector, top=10, return_metadata=True, min_sequence=3, allow_partial=True),
        client.search_request(small, mode="copy"),
        client.search_request(large, filter={"color": "red", "price": {"lt": 100}}),
    ]
    assert [next(iter(s["query"])) for s in searches] == ["id", "vector", "image_b64", "key"]
    for request in searches:
        assert violations(request, P.SearchRequest) == [], request
    keyed = {"key": "sku-1", "attributes": {"price": 59}}  # what upsert_async passes on
    indexes = [
        client.index_request(uuid.uuid4().hex, "/data/photos", True, None, "local"),
        client.index_request(uuid.uuid4().hex, "upload:x", False, 0.05, "network", keyed),
        client.index_request(
            uuid.uuid4().hex, "https://example.org/a.jpg", False, 0.0, "network", {"key": "k"}
        ),
    ]
    for request in indexes:
        assert violations(request, P.IndexRequest) == [], request
    others: list[tuple[Any, Any]] = [
        (client.set_attributes_request("sku-1", {"color": "blue"}), P.SetAttributesRequest),
        (client.remove_request(12), P.RemoveByIdRequest),
        (client.remove_request(key="sku-1"), P.RemoveByKeyRequest),
    ]
    for request, tp in others:
        assert violations(request, tp) == [], request


def test_the_vector_requests_match() -> None:
    vectors = np.ones((2, 8), np.float32)
    assert violations(nearest_request("default", vectors), P.NearestRequest) == []
    assert violations(nearest_request("default", vectors, top=30), P.NearestRequest) == []
    search: P.SearchRequest = {
        "collection": "c",
        "query": {"id": 1},
        "filter": {"color": "red"},
        "min_sequence": 2,
    }
    for task in (search, {"collection": "c", "vectors_b64": "", "dim": 8}):
        request = shard_request("c", vectors, 5, task)  # type: ignore[arg-type]
        assert violations(request, P.ShardSearchRequest) == [], request
    assert "filter" in shard_request("c", vectors, 5, search)


@pytest.fixture
def rt(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Runtime:
    # Small limits, so that one folder gives inline, staged and failed items.
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=redis_url, inline_item_bytes=1500, max_image_bytes=20_000
    )
    return Runtime(settings)


def photos(folder: Path) -> Path:
    folder.mkdir()
    (folder / "small.png").write_bytes(encode(pattern(1, (16, 16)), "PNG"))  # inline
    (folder / "medium.jpg").write_bytes(encode(pattern(2), "JPEG"))  # staged
    (folder / "huge.bmp").write_bytes(encode(pattern(3, (200, 200)), "BMP"))  # too large: an error item
    (folder / "list.jsonl").write_text(
        json.dumps({"uri": str(folder / "small.png"), "key": "sku-1", "attributes": {"price": 59}}) + "\n"
    )
    return folder


def expand(rt: Runtime, request: P.IndexRequest) -> tuple[P.IndexResult, list[P.EmbedRequest]]:
    rt.coordinator(request["collection"]).create_job(request["job_id"], {"collection": request["collection"]})
    batches: list[P.EmbedRequest] = []
    result = expand_job(rt, request, batches.append)
    return result, batches


def test_what_ingest_dispatches_matches(rt: Runtime, tmp_path: Path, client: PupylQueue) -> None:
    folder = photos(tmp_path / "photos")
    jobs = [
        client.index_request(uuid.uuid4().hex, str(folder), False, 0.02, "local"),
        client.index_request(uuid.uuid4().hex, str(folder / "list.jsonl"), True, None, "local"),
    ]
    items: list[P.EmbedItem] = []
    for request in jobs:
        result, batches = expand(rt, request)
        assert violations(result, P.IndexResult) == [], result
        assert batches and result["batches"] == len(batches)
        for batch in batches:
            assert violations(batch, P.EmbedRequest) == [], batch
            items.extend(batch["items"])
    kinds = {next(k for k in ("data_b64", "key", "path", "error") if k in item) for item in items}
    assert kinds == {"data_b64", "key", "error"}  # every way a folder's item travels
    assert any(item.get("image_key") == "sku-1" and item.get("attributes") for item in items)

    # PUPYL_LOCAL_REFERENCES: paths instead of bytes; an upsert's upload job: one keyed item.
    referencing = Runtime(rt.settings.replace(local_references=True))
    _, batches = expand(referencing, client.index_request(uuid.uuid4().hex, str(folder), False, 0.0, "local"))
    assert any("path" in item for batch in batches for item in batch["items"])
    for batch in batches:
        assert violations(batch, P.EmbedRequest) == [], batch
    job_id = uuid.uuid4().hex
    rt.store.put(Layout().upload(job_id, 0, "a.png"), encode(pattern(4, (16, 16)), "PNG"))
    upsert = client.index_request(job_id, C.UPLOAD_SCHEME + job_id, False, 0.0, "network", {"key": "u1"})
    _, batches = expand(rt, upsert)
    assert batches[0]["items"][0].get("image_key") == "u1"
    assert violations(batches[0], P.EmbedRequest) == []


def test_the_payload_types_need_no_worker_side_module() -> None:
    """payloads.py is producer side: the standard library only (lint-imports checks the layers)."""
    source = Path(P.__file__).read_text()
    imports = set(re.findall(r"^(?:from|import) ([\w.]+)", source, re.MULTILINE))
    assert imports == {"typing"}
