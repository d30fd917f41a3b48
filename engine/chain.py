"""What the two hash chains share (a job's audit.jsonl and the outbox's journal): the genesis
hash before the first line, and the check that links one line to the one before."""

from __future__ import annotations

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
