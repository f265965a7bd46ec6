"""Keys, attributes and filters (issue #17): what is accepted, what is refused and why, and that the
column store selects exactly what a plain Python reading of the filter selects."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from pupyl_queue.attributes import (
    AttributeTable,
    Clause,
    InvalidAttribute,
    Node,
    check_attributes,
    check_key,
    parse_filter,
)


@pytest.mark.parametrize(
    "key, reason",
    [("", "non-empty"), (None, "non-empty"), (5, "non-empty"), ("x" * 257, "256 bytes"),
     ("é" * 129, "256 bytes"), ("a\nb", "control"), ("a\x00", "control")],
)  # fmt: skip
def test_bad_keys(key: Any, reason: str) -> None:
    with pytest.raises(InvalidAttribute, match=reason):
        check_key(key)


def test_good_keys() -> None:
    assert check_key("SKU-1/ä") == "SKU-1/ä" and check_key("x" * 256) == "x" * 256


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"size": {"w": 1}}, "nested objects"),
        ({"tags": ["a", 1]}, "list holds"),
        ({"price": float("nan")}, "finite"),
        ({"n": 2**64}, "64-bit"),
        ({"bad name": 1}, "invalid attribute name"),
        ({"width": 3}, "reserved"),
        ({"key": "x"}, "reserved"),
        ({"x": None}, "NoneType"),
        ({f"f{i}": i for i in range(65)}, "at most 64"),
        ({"text": "x" * 1025}, "at most 1024"),
    ],
)
def test_bad_attributes(attributes: Any, reason: str) -> None:
    with pytest.raises(InvalidAttribute, match=reason):
        check_attributes(attributes)


def test_good_attributes() -> None:
    value = {"category": "shoes", "price": 99.5, "stock": 3, "sale": False, "tags": ["red", "leather"]}
    assert check_attributes(value) == value
    assert check_attributes('{"a": 1}') == {"a": 1} and check_attributes(None) == {}


def test_filter_parsing() -> None:
    assert parse_filter(None) is None and parse_filter({}) is None
    assert parse_filter({"category": "shoes"}) == Clause("category", "eq", ("shoes",))
    parsed = parse_filter({"category": "shoes", "price": {"gte": 10, "lt": 100}})
    assert parsed == Node(
        "and",
        (
            Clause("category", "eq", ("shoes",)),
            Clause("price", "gte", (10.0,)),
            Clause("price", "lt", (100.0,)),
        ),
    )
    assert parse_filter('{"indexed_at": {"gte": "2026-01-01T00:00:00Z"}}') == Clause(
        "indexed_at", "gte", (1767225600.0,)
    )
    for bad, reason in [
        ({"price": {"between": [1, 2]}}, "unknown operator"),
        ({"price": {"lt": "soon"}}, "range bound"),
        ({"tags": {"any": [1]}}, "'any' matches strings"),
        ({"tags": {"in": []}}, "list of 1 to"),
        ({"or": {}}, "non-empty list"),
        ({"a": None}, "compare with"),
        ({"a": [1]}, "compare with"),
        ([1], "JSON object"),
        ({"or": [{"a": 1}] * 70}, "at most 64"),
    ]:
        with pytest.raises(InvalidAttribute, match=reason):
            parse_filter(bad)


def reference(spec: Any, row: dict[str, Any]) -> bool:
    """The meaning of a filter, read plainly, for one row."""
    if "and" in spec or "or" in spec or "not" in spec:
        if "not" in spec:
            return not reference(spec["not"], row)
        parts = [reference(s, row) for s in spec.get("and", spec.get("or"))]
        return all(parts) if "and" in spec else any(parts)
    if len(spec) > 1:  # fields are and-ed, and so are the operators of one field
        return all(reference({name: cond}, row) for name, cond in spec.items())
    name, cond = next(iter(spec.items()))
    if isinstance(cond, dict) and len(cond) > 1:
        return all(reference({name: {op: arg}}, row) for op, arg in cond.items())
    value = row.get(name)
    if not isinstance(cond, dict):
        cond = {"eq": cond}
    op, arg = next(iter(cond.items()))
    if value is None:
        return False
    if isinstance(value, list):
        wanted = arg if isinstance(arg, list) else [arg]
        return op in ("any", "in", "eq") and any(v in wanted for v in value if isinstance(v, str))
    if op == "eq":
        return type(value) is type(arg) and value == arg or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and isinstance(arg, (int, float)) and not isinstance(arg, bool) and value == arg
        )  # fmt: skip
    if op == "in":
        return any(reference({name: {"eq": a}}, row) for a in arg)
    if op == "any" or isinstance(value, (str, bool)):
        return False
    return {"gt": value > arg, "gte": value >= arg, "lt": value < arg, "lte": value <= arg}[op]


def test_table_selects_what_the_filter_says() -> None:
    rng = random.Random(17)
    colours = ["red", "green", "blue", "black"]
    rows = []
    for _ in range(3000):
        row: dict[str, Any] = {}
        if rng.random() < 0.9:
            row["category"] = rng.choice(["shoes", "bags", "hats"])
        if rng.random() < 0.8:
            row["price"] = rng.choice([rng.randint(1, 300), round(rng.uniform(1, 300), 2)])
        if rng.random() < 0.7:
            row["tags"] = rng.sample(colours, rng.randint(0, 3))
        if rng.random() < 0.5:
            row["sale"] = rng.random() < 0.5
        rows.append(row)
    table = AttributeTable()
    for start in range(0, len(rows), 700):  # appended in batches, as commits arrive
        table.add(range(start + 10, start + 10 + len(rows[start : start + 700])), rows[start : start + 700])
    removed = set(range(10, 3010, 7))
    table.remove(removed)
    filters = [
        {"category": "shoes"},
        {"price": {"lt": 100}},
        {"category": "shoes", "price": {"gte": 50, "lte": 120}},
        {"tags": {"any": ["red", "blue"]}},
        {"tags": "green"},
        {"sale": True},
        {"category": {"in": ["bags", "hats"]}},
        {"price": {"in": [42, 7.0]}},
        {"or": [{"category": "hats"}, {"price": {"gt": 290}}]},
        {"not": {"category": "shoes"}},
        {"and": [{"tags": {"any": ["black"]}}, {"not": {"sale": False}}]},
        {"unknown": "x"},
        {"category": 1},
    ]
    for spec in filters:
        got = sorted(table.select(parse_filter(spec)).tolist())
        expected = [i + 10 for i, row in enumerate(rows) if i + 10 not in removed and reference(spec, row)]
        assert got == expected, spec
    assert len(table) == 3000 - len(removed)
    assert table.nbytes() < 3000 * 64


def test_a_field_keeps_its_first_type() -> None:
    table = AttributeTable()
    table.add([1, 2], [{"size": 3}, {"size": "large"}])  # the second was refused at ingestion
    assert table.select(parse_filter({"size": {"gte": 3}})).tolist() == [1]
    assert table.select(parse_filter({"size": "large"})).tolist() == []
    assert np.array_equal(table.select(parse_filter({"width": {"gt": 0}})), np.zeros(0, np.int64))


def test_unique_strings_cost_a_hash_per_row_not_a_vocabulary() -> None:
    """``path`` is unique per image: its column holds 8 bytes a row, and still matches exactly."""
    table = AttributeTable()
    n = 50_000
    table.add(
        range(n),
        ({"path": f"shop/{i:07d}/front.jpg", "category": "shoe" if i % 2 else "hat"} for i in range(n)),
    )
    assert table.nbytes() < n * (8 + 1 + 8 + 8 + 2)  # ids, live, path hash, category hash, slack
    assert table.select(parse_filter({"path": "shop/0012345/front.jpg"})).tolist() == [12345]
    wanted = {"path": {"in": ["shop/0000007/front.jpg", "shop/0000008/front.jpg", "nowhere.jpg"]}}
    assert table.select(parse_filter(wanted)).tolist() == [7, 8]
    both = {
        "and": [{"category": "hat"}, {"path": {"in": ["shop/0000007/front.jpg", "shop/0000008/front.jpg"]}}]
    }
    assert table.select(parse_filter(both)).tolist() == [8]
    assert table.select(parse_filter({"path": "shop/0000007/back.jpg"})).tolist() == []
