"""Lists of references, with the caller's key and attributes per line: plain text, CSV, JSON Lines.

- Plain text or a CSV without a recognised header: the first column is the reference (as before).
- CSV with a header naming a ``uri`` (or ``url`` / ``path``) column: an optional ``key`` column, and
  every other column an attribute. ``price:number``, ``in_stock:bool``, ``tags:strings`` (values
  separated by ``|``) or ``sku_name:string`` declare a column's type; an undeclared column takes the
  type of its first non-empty cell: an integer or decimal number is a ``number``, ``true``/``false``
  (any case) a ``bool``, anything else a ``string``. An empty cell leaves the attribute out.
- JSON Lines (the first non-blank line starts with ``{``): ``{"uri": ..., "key": ..., "attributes": {...}}``.

Each line becomes a :class:`ListRow`: its reference, key and attributes, or the reason it has none,
so a bad line is one failed item and the rest of the list goes on.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pupyl_queue.attributes import TYPES, InvalidAttribute, check_attributes, check_field_name, check_key

URI_COLUMNS = ("uri", "url", "path")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
LIST_SEPARATOR = "|"


@dataclass
class ListRow:
    ref: str
    line: int
    where: str  # "<list>:<line>"
    key: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def read_list(ref: str, text: str) -> Iterator[ListRow]:
    """The rows of a list file's text (already decoded); blank lines and ``#`` comments are skipped."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("{"):
        yield from _json_lines(ref, text)
        return
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    columns = _header(header)
    if columns is None:  # no header of ours: the first column of every line, the first line included
        for number, row in enumerate([header or [], *rows], 1):
            entry = row[0].strip() if row else ""
            if entry and not entry.startswith("#"):
                yield ListRow(entry, number, f"{ref}:{number}")
        return
    yield from _csv_rows(ref, columns, rows)


def _header(row: list[str] | None) -> list[tuple[str, str]] | None:
    """(name, declared type or '') per column, when the first row is a header naming a uri column."""
    if not row:
        return None
    names = [cell.strip() for cell in row]
    plain = [name.split(":", 1)[0].strip().lower() for name in names]
    if not any(name in URI_COLUMNS for name in plain) or len(row) == 1 and plain[0] not in URI_COLUMNS:
        return None
    columns = []
    for name, lowered in zip(names, plain):
        base, _, kind = name.partition(":")
        columns.append((lowered if lowered in (*URI_COLUMNS, "key") else base.strip(), kind.strip().lower()))
    return columns


def _csv_rows(ref: str, columns: list[tuple[str, str]], rows: Iterator[list[str]]) -> Iterator[ListRow]:
    uri_at = next(i for i, (name, _) in enumerate(columns) if name in URI_COLUMNS)
    key_at = next((i for i, (name, _) in enumerate(columns) if name == "key"), None)
    types: dict[str, str] = {}
    problem = _columns_problem(columns, uri_at, key_at)
    for number, row in enumerate(rows, 2):
        where = f"{ref}:{number}"
        if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        entry = row[uri_at].strip() if uri_at < len(row) else ""
        result = ListRow(entry[:200] or f"(line {number})", number, where)
        if problem:
            result.error = f"{problem} ({where})"
        elif len(row) != len(columns):
            result.error = f"{len(row)} columns where the header has {len(columns)} ({where})"
        elif not entry:
            result.error = f"no uri ({where})"
        else:
            try:
                key = row[key_at].strip() if key_at is not None else ""
                result.key = check_key(key) if key else ""
                result.attributes = check_attributes(_typed(columns, row, {uri_at, key_at}, types))
            except InvalidAttribute as exc:
                result.error = f"{exc} ({where})"
        yield result


def _columns_problem(columns: list[tuple[str, str]], uri_at: int, key_at: int | None) -> str:
    seen: set[str] = set()
    for at, (name, kind) in enumerate(columns):
        if name in seen:
            return f"the header names {name!r} twice"
        seen.add(name)
        if at in (uri_at, key_at):
            continue
        if kind and kind not in TYPES:
            return f"column {name!r}: unknown type {kind!r} (use {', '.join(TYPES)})"
        try:
            check_field_name(name, builtin_ok=False)
        except InvalidAttribute as exc:
            return str(exc)
    return ""


def _typed(
    columns: list[tuple[str, str]], row: list[str], skip: set[int | None], types: dict[str, str]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for at, ((name, declared), cell) in enumerate(zip(columns, row)):
        text = cell.strip()
        if at in skip or not text:
            continue
        kind = declared or types.get(name) or _infer(text)
        types.setdefault(name, kind)
        values[name] = _convert(name, kind, text)
    return values


def _infer(text: str) -> str:
    if NUMBER.fullmatch(text):
        return "number"
    if text.lower() in ("true", "false"):
        return "bool"
    return "string"


def _convert(name: str, kind: str, text: str) -> Any:
    if kind == "strings":
        return [part.strip() for part in text.split(LIST_SEPARATOR) if part.strip()]
    if kind == "string":
        return text
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise InvalidAttribute(f"attribute {name!r}: expected true or false, got {text[:40]!r}")
        return text.lower() == "true"
    if not NUMBER.fullmatch(text):
        raise InvalidAttribute(f"attribute {name!r}: expected a number, got {text[:40]!r}")
    number = float(text)
    return int(text) if re.fullmatch(r"[+-]?\d+", text) and abs(int(text)) < 2**63 else number


def _json_lines(ref: str, text: str) -> Iterator[ListRow]:
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{ref}:{number}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            yield ListRow(line.strip()[:200], number, where, error=f"not a JSON object ({where})")
            continue
        if not isinstance(record, dict):
            yield ListRow(line.strip()[:200], number, where, error=f"not a JSON object ({where})")
            continue
        uri = record.get("uri", record.get("url"))
        row = ListRow(
            uri[:200] if isinstance(uri, str) and uri.strip() else f"(line {number})", number, where
        )
        try:
            if not isinstance(uri, str) or not uri.strip():
                raise InvalidAttribute("no uri")
            unknown = set(record) - {"uri", "url", "key", "attributes"}
            if unknown:
                raise InvalidAttribute(f"unknown field(s) {', '.join(sorted(unknown))}")
            row.ref = uri.strip()
            row.key = check_key(record["key"]) if record.get("key") is not None else ""
            row.attributes = check_attributes(record.get("attributes"))
        except InvalidAttribute as exc:
            row.error = f"{exc} ({where})"
        yield row
