"""What the two hash chains share (a job's audit.jsonl and the outbox's journal): the genesis
hash before the first line, the check that links one line to the one before, and where a
chain's whole lines end (its torn tail)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

GENESIS = "0" * 64  # the `prev` of a chain's first line


def chain_break(record: dict[str, Any], number: int, prev: str, hash_of: Callable[[dict[str, Any]], str]) -> str | None:
    """Why line `number` does not continue the chain whose last hash is `prev`, or None."""
    if record.get("prev") != prev:
        return f"'prev' does not match line {number - 1}'s hash (a line removed, inserted or reordered)"
    if record.get("hash") != hash_of(record):
        return "content does not match its hash (line edited)"
    return None


MAX_LINE = 64 << 20  # bytes; a chain's line is KBs (a job's first audit line, listing up to 10,000 dropped files, the largest): a longer one is not ours


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """A chain's line as written (a JSON object with a string `hash`), or None."""
    if len(raw) > MAX_LINE:
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("hash"), str) else None


def good_prefix(data: bytes) -> int:
    """How many leading bytes of a chain file are whole lines. The tail that is not: a torn last
    line (a kill or power cut mid-write, a share that lost a write), NUL padding a file system
    left after a crash, and unreadable lines at the very end. A damaged line *followed by* good
    ones is not a tail: the chain check names it."""
    end = data.rfind(b"\n") + 1
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        if parse_line(data[start:end - 1]) is not None:
            break
        end = start
    return end
