"""Every log line this test process writes, for tests that look for secrets in them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.text, self.seen = "", 0

    def emit(self, record: logging.LogRecord) -> None:
        self.text += self.format(record) + "\n"
        self.seen += 1


@contextmanager
def all_log_lines() -> Iterator[LogLines]:
    """The root logger at DEBUG for the duration: every line any library here could write."""
    lines = LogLines()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(lines)
    try:
        yield lines
    finally:
        root.removeHandler(lines)
        root.setLevel(level)
