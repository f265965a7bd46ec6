"""Callers' keys and attributes, and the filters that select images by them.

An application indexes its images under its own keys (a SKU, a record id) with a small JSON object of
attributes, and searches within a subset: ``{"category": "shoes", "price": {"lt": 100}}``. This module
holds the rules for both (what a key and an attribute may be, what a filter may say) and
:class:`AttributeTable`, the column store a search worker keeps in memory to turn a filter into the
ids it allows. It imports neither FAISS nor TensorFlow: producers validate with it too.

Types are few on purpose: ``string``, ``number`` (integers and floats alike, compared as float64),
``bool`` and ``strings`` (a list of strings). A field keeps the type it first had in a collection.
Built-in metadata (``format``, ``width``, ``height``, ``job``, ``indexed_at``, ``path``) is filtered
the same way; an attribute may not take one of those names.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_KEY_BYTES = 256
MAX_FIELDS = 64
MAX_STRING = 1024
MAX_LIST = 64
MAX_ATTRIBUTES_BYTES = 8 * 1024
MAX_FILTER_CLAUSES = 64
MAX_FILTER_VALUES = 1024
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
BUILTIN = {"format": "string", "width": "number", "height": "number", "job": "string", "indexed_at": "number"}
BUILTIN["path"] = "string"  # the collection-relative path (original_path/original_file_name)
RESERVED = {*BUILTIN, "id", "key", "distance", "and", "or", "not"}
TYPES = ("string", "number", "bool", "strings")
RANGES = ("gt", "gte", "lt", "lte")
OPERATORS = ("eq", "in", "any", *RANGES)


class InvalidAttribute(ValueError):
    """A key, attribute or filter that is not allowed; the message is the per-item reason."""


def check_key(key: Any) -> str:
    """A caller's key: a non-empty string of at most 256 bytes (UTF-8), no control characters."""
    if not isinstance(key, str) or not key:
        raise InvalidAttribute("a key is a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidAttribute(f"a key is at most {MAX_KEY_BYTES} bytes (UTF-8)")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidAttribute("a key may not hold control characters")
    return key


def type_of(value: Any) -> str:
    """The attribute type of a JSON value, or an error that says why it has none."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidAttribute("integers are 64-bit")
        return "number"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAttribute("numbers must be finite")
        return "number"
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise InvalidAttribute(f"strings are at most {MAX_STRING} characters")
        return "string"
    if isinstance(value, list):
        if len(value) > MAX_LIST or not all(isinstance(v, str) and len(v) <= MAX_STRING for v in value):
            raise InvalidAttribute(f"a list holds at most {MAX_LIST} strings")
        return "strings"
    if isinstance(value, dict):
        raise InvalidAttribute("nested objects are not attributes (use flat names such as size.width)")
    raise InvalidAttribute(f"{type(value).__name__} is not an attribute type (string, number, bool, strings)")


def check_attributes(attributes: Any) -> dict[str, Any]:
    """A JSON object of attributes, checked field by field; the first problem is the reason."""
    if attributes is None:
        return {}
    if isinstance(attributes, str):
        try:
            attributes = json.loads(attributes)
        except ValueError:
            raise InvalidAttribute("attributes are not valid JSON") from None
    if not isinstance(attributes, dict):
        raise InvalidAttribute("attributes are a JSON object")
    if len(attributes) > MAX_FIELDS:
        raise InvalidAttribute(f"at most {MAX_FIELDS} attributes")
    for name, value in attributes.items():
        check_field_name(name, builtin_ok=False)
        try:
            type_of(value)
        except InvalidAttribute as exc:
            raise InvalidAttribute(f"attribute {name!r}: {exc}") from None
    if len(json.dumps(attributes)) > MAX_ATTRIBUTES_BYTES:
        raise InvalidAttribute(f"attributes are at most {MAX_ATTRIBUTES_BYTES} bytes of JSON")
    return dict(attributes)


def check_field_name(name: Any, builtin_ok: bool = True) -> str:
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
        raise InvalidAttribute(f"invalid attribute name {name!r}: letters, digits, '_', '.', '-', up to 64")
    if name in RESERVED and not (builtin_ok and name in BUILTIN):
        raise InvalidAttribute(f"{name!r} is a reserved name")
    return name


# --- filters
@dataclass(frozen=True)
class Clause:
    """One condition on one field: ``op`` is eq, in, any, gt, gte, lt or lte."""

    name: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Node:
    """``and`` / ``or`` / ``not`` of clauses and nodes."""

    op: str
    children: tuple[Node | Clause, ...] = field(default_factory=tuple)


Filter = Node | Clause


def parse_filter(spec: Any) -> Filter | None:
    """A filter from its JSON form; None for no filter. Raises InvalidAttribute with the reason.

    ``{"category": "shoes", "price": {"lt": 100}}`` (fields are and-ed), ``{"tags": {"any": ["red"]}}``,
    ``{"brand": {"in": ["a", "b"]}}``, ``{"or": [f, f]}``, ``{"and": [...]}``, ``{"not": f}``. Ranges
    take numbers, or for ``indexed_at`` also ISO 8601 times.
    """
    if spec is None or spec == {}:
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise InvalidAttribute("a filter is a JSON object") from None
    counter = [0]
    return _parse(spec, counter)


def _parse(spec: Any, counter: list[int]) -> Filter:
    if not isinstance(spec, dict) or not spec:
        raise InvalidAttribute("a filter is a non-empty JSON object")
    parts: list[Filter] = []
    for name, cond in spec.items():
        counter[0] += 1
        if counter[0] > MAX_FILTER_CLAUSES:
            raise InvalidAttribute(f"a filter has at most {MAX_FILTER_CLAUSES} conditions")
        if name in ("and", "or"):
            if not isinstance(cond, list) or not cond:
                raise InvalidAttribute(f"{name!r} takes a non-empty list of filters")
            parts.append(Node(name, tuple(_parse(c, counter) for c in cond)))
        elif name == "not":
            parts.append(Node("not", (_parse(cond, counter),)))
        else:
            parts.extend(_clauses(check_field_name(name), cond))
    return parts[0] if len(parts) == 1 else Node("and", tuple(parts))


def _clauses(name: str, cond: Any) -> list[Clause]:
    if not isinstance(cond, dict):
        return [Clause(name, "eq", (_scalar(name, cond),))]
    if not cond:
        raise InvalidAttribute(f"{name}: an empty condition")
    out = []
    for op, value in cond.items():
        if op not in OPERATORS:
            raise InvalidAttribute(f"{name}: unknown operator {op!r} (use {', '.join(OPERATORS)})")
        if op in ("in", "any"):
            if not isinstance(value, list) or not 0 < len(value) <= MAX_FILTER_VALUES:
                raise InvalidAttribute(f"{name}: {op!r} takes a list of 1 to {MAX_FILTER_VALUES} values")
            values = tuple(_scalar(name, v) for v in value)
            if op == "any" and not all(isinstance(v, str) for v in values):
                raise InvalidAttribute(f"{name}: 'any' matches strings of a list attribute")
            out.append(Clause(name, op, values))
        elif op == "eq":
            out.append(Clause(name, op, (_scalar(name, value),)))
        else:
            out.append(Clause(name, op, (_bound(name, value),)))
    return out


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, (list, dict)) or value is None:
        raise InvalidAttribute(f"{name}: compare with a string, a number or a boolean")
    type_of(value)
    return value


def _bound(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidAttribute(f"{name}: a range bound is a number or an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidAttribute(f"{name}: a range bound is a number or an ISO 8601 time")
    return float(value)


def builtin_values(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The filterable built-in fields of an image's metadata."""
    path = "/".join(p for p in (meta.get("collection_path"), meta.get("original_file_name")) if p)
    values = {
        "format": meta.get("format"),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "job": meta.get("job_id") or meta.get("job"),
        "indexed_at": meta.get("indexed_at"),
        "path": path or None,
    }
    return {k: v for k, v in values.items() if v is not None}


# --- the column store of a search worker
class _Column:
    """One field over every row: a 64-bit hash per row (strings), float64 (numbers), codes into a
    vocabulary (bools), or a CSR list of vocabulary codes (string lists). Absent values are 0 / NaN /
    -1 / an empty list.

    Strings are hashed, not coded: a string field may be unique per row (``path``), and a vocabulary
    of ten million Python strings costs ~200 bytes a row where a hash costs 8. Equality is all a
    string filter asks, and two strings share a 64-bit hash with odds of one in 10^19 per pair: the
    table lives in one process, so Python's own (salted) string hash serves. String lists keep a
    vocabulary: tags repeat.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.vocab: dict[Any, int] = {}
        dtype = {"number": np.float64, "string": np.int64}.get(kind, np.int32)
        self.data = np.full(0, {"number": np.nan, "string": 0}.get(kind, -1), dtype)
        self.offsets = np.zeros(1, np.int64)  # strings: row r holds items[offsets[r]:offsets[r + 1]]
        self.items = np.zeros(0, np.int32)
        self.rows = 0

    def code(self, value: Any) -> int:
        return self.vocab.setdefault(value, len(self.vocab))

    def extend(self, values: list[Any]) -> None:
        n = len(values)
        if self.kind == "strings":
            lists = [v if isinstance(v, list) else [] for v in values]
            codes = np.fromiter((self.code(s) for lst in lists for s in lst), np.int32)
            sizes = np.fromiter((len(lst) for lst in lists), np.int64, n)
            used = int(self.offsets[self.rows])
            self.items = _append(self.items, codes, used)
            self.offsets = _append(self.offsets, used + np.cumsum(sizes), self.rows + 1)
        elif self.kind == "number":
            column = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            self.data = _append(self.data, column, self.rows)
        elif self.kind == "string":
            column = np.array([0 if v is None else _string_hash(v) for v in values], np.int64)
            self.data = _append(self.data, column, self.rows)
        else:
            column = np.array([-1 if v is None else self.code(v) for v in values], np.int32)
            self.data = _append(self.data, column, self.rows)
        self.rows += n

    def pad(self, rows: int) -> None:
        if rows > self.rows:
            self.extend([None] * (rows - self.rows))

    def match(self, clause: Clause) -> np.ndarray:
        rows = self.rows
        if self.kind == "number":
            column = self.data[:rows]
            with np.errstate(invalid="ignore"):
                if clause.op in ("eq", "in"):
                    wanted = [float(v) for v in clause.values if _is_number(v)]
                    return np.isin(column, wanted) if wanted else np.zeros(rows, bool)
                bound = clause.values[0]
                return {"gt": column > bound, "gte": column >= bound, "lt": column < bound}.get(
                    clause.op, column <= bound
                )
        if clause.op in RANGES:
            return np.zeros(rows, bool)
        if self.kind == "string":
            hashes = [_string_hash(v) for v in clause.values if isinstance(v, str)]
            if clause.op == "any" or not hashes:
                return np.zeros(rows, bool)
            return self.data[:rows] == hashes[0] if len(hashes) == 1 else np.isin(self.data[:rows], hashes)
        codes = [self.vocab[v] for v in clause.values if _same_kind(self.kind, v) and v in self.vocab]
        if self.kind == "strings":
            if clause.op not in ("any", "eq", "in") or not codes:
                return np.zeros(rows, bool)
            hits = self._lookup(codes)[self.items[: int(self.offsets[rows])] + 1]
            running = np.concatenate(([0], np.cumsum(hits, dtype=np.int64)))
            return running[self.offsets[1 : rows + 1]] > running[self.offsets[:rows]]
        if clause.op == "any" or not codes:
            return np.zeros(rows, bool)
        if len(codes) == 1:
            return self.data[:rows] == codes[0]
        return self._lookup(codes)[self.data[:rows] + 1]

    def _lookup(self, codes: list[int]) -> np.ndarray:
        """A table code + 1 -> wanted (slot 0: absent): one gather per row, whatever the value count."""
        table = np.zeros(len(self.vocab) + 1, bool)
        table[np.asarray(codes) + 1] = True
        return table

    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes + self.items.nbytes) + 64 * len(self.vocab)


def _string_hash(value: str) -> int:
    return hash(value) or 1  # 0 marks an absent value


def _same_kind(kind: str, value: Any) -> bool:
    return isinstance(value, bool) if kind == "bool" else isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _append(array: np.ndarray, values: np.ndarray, used: int) -> np.ndarray:
    """Write ``values`` at ``used``, growing the array by doubling (amortized O(1) per row)."""
    need = used + len(values)
    if need > len(array):
        grown = np.full(max(need, 2 * len(array), 1024), _blank(array), array.dtype)
        grown[:used] = array[:used]
        array = grown
    array[used:need] = values
    return array


def _blank(array: np.ndarray) -> Any:
    return np.nan if array.dtype == np.float64 else (-1 if array.dtype == np.int32 else 0)


class AttributeTable:
    """Every live image's filterable values, by column; rows are appended in commit order.

    A filter becomes a boolean mask over rows in a few vectorized passes (about a millisecond per
    condition at a million rows), then the ids it allows. Removed ids are dropped from ``live``;
    their rows are reclaimed when the table is rebuilt (with the snapshot, at compaction).
    """

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.live = np.zeros(0, bool)
        self.rows = 0
        self.columns: dict[str, _Column] = {}
        self.types: dict[str, str] = dict(BUILTIN)

    def __len__(self) -> int:
        return int(self.live[: self.rows].sum())

    def add(self, ids: Iterable[int], values: Iterable[Mapping[str, Any]]) -> None:
        """Rows for new ids: each a dict of field -> value (built-in metadata and attributes merged).
        A value whose type differs from the field's is left out (it was refused at ingestion)."""
        ids = np.asarray(list(ids), np.int64)
        rows = list(values)
        if len(rows) != len(ids):
            raise ValueError("one row of values per id")
        names = {name for row in rows for name in row}
        for name in names:
            for row in rows:
                if name in row and row[name] is not None:
                    kind = self.types.setdefault(name, type_of(row[name]))
                    if name not in self.columns:
                        self.columns[name] = _Column(kind)
                        self.columns[name].pad(self.rows)
                    break
        for name, column in self.columns.items():
            kind = self.types[name]
            column.extend([_fit(kind, row.get(name)) for row in rows])
        self.ids = _append(self.ids, ids, self.rows)
        self.live = _append(self.live, np.ones(len(ids), bool), self.rows)
        self.rows += len(ids)

    def remove(self, ids: Iterable[int]) -> None:
        gone = np.asarray(list(ids), np.int64)
        if len(gone):
            self.live[: self.rows] &= ~np.isin(self.ids[: self.rows], gone)

    def select(self, spec: Filter) -> np.ndarray:
        """The live ids a filter allows (in commit order)."""
        mask = self._mask(spec)
        mask &= self.live[: self.rows]
        return self.ids[: self.rows][mask]

    def _mask(self, spec: Filter) -> np.ndarray:
        if isinstance(spec, Clause):
            column = self.columns.get(spec.name)
            return np.zeros(self.rows, bool) if column is None else column.match(spec)
        masks = [self._mask(child) for child in spec.children]
        if spec.op == "not":
            return ~masks[0]
        return np.logical_and.reduce(masks) if spec.op == "and" else np.logical_or.reduce(masks)

    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.live.nbytes) + sum(c.nbytes() for c in self.columns.values())


def _fit(kind: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        return value if type_of(value) == kind else None
    except InvalidAttribute:
        return None
