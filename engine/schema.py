"""Validation of TOML tables into frozen dataclasses, reporting every problem at once.

Each dataclass field carries a *checker* in its metadata (`rule(...)`). `build()` walks a
table, converts what is valid, and appends a `Problem` with the full key path
(``train.phases[2].lr``) for everything that is not: unknown keys, wrong types, numbers
out of range, strings not in a set of choices. Deeper code trusts the result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from engine.errors import Problem

INVALID = object()  # a checker's "no usable value" (its problem is already recorded)

Checker = Callable[[Any, str, list[Problem]], Any]


def rule(check: Checker, doc: str = "") -> dict[str, Any]:
    """Field metadata: `field(default=..., metadata=rule(Int(1, 64)))`."""
    return {"check": check, "doc": doc}


MAX_KEY_CHARS = 64  # a key longer than this is shown cut, with its length (it is junk, not a typo)


def key_text(key: str) -> str:
    """A free-form key as it appears in a problem's place: as is, or cut to MAX_KEY_CHARS."""
    return key if len(key) <= MAX_KEY_CHARS else f"{key[:MAX_KEY_CHARS]}…({len(key)} characters)"


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


class Int:
    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(where, f"expected an integer, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        return _in_range(value, self.low, self.high, where, problems)


class Float:
    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(where, f"expected a number, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        value = float(value)
        if not math.isfinite(value):
            problems.append(Problem(where, f"must be a finite number, got {value}"))
            return INVALID
        if self.low_open and self.low is not None and value <= self.low:
            problems.append(Problem(where, f"must be greater than {self.low}, got {value}"))
            return INVALID
        return _in_range(value, None if self.low_open else self.low, self.high, where, problems)


def _in_range(value: Any, low: Any, high: Any, where: str, problems: list[Problem]) -> Any:
    if low is not None and value < low:
        problems.append(Problem(where, f"must be at least {low}, got {value}"))
        return INVALID
    if high is not None and value > high:
        problems.append(Problem(where, f"must be at most {high}, got {value}"))
        return INVALID
    return value


class Bool:
    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if not isinstance(value, bool):
            problems.append(Problem(where, f"expected true or false, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        return value


class Str:
    def __init__(
        self,
        *,
        choices: tuple[str, ...] | None = None,
        pattern: str | None = None,
        pattern_doc: str = "",
        min_len: int = 0,
        max_len: int = 1000,
    ) -> None:
        self.choices, self.min_len, self.max_len = choices, min_len, max_len
        self.pattern = re.compile(pattern) if pattern else None
        self.pattern_doc = pattern_doc

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if not isinstance(value, str):
            problems.append(Problem(where, f"expected a string, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        if self.choices is not None and value not in self.choices:
            problems.append(Problem(where, f"must be one of {', '.join(map(repr, self.choices))}, got {value!r:.60}"))
            return INVALID
        if len(value) < self.min_len:
            problems.append(Problem(where, "must not be empty" if self.min_len == 1 else f"must be at least {self.min_len} characters"))
            return INVALID
        if len(value) > self.max_len:
            problems.append(Problem(where, f"must be at most {self.max_len} characters, got {len(value)}"))
            return INVALID
        if self.pattern is not None and not self.pattern.fullmatch(value):
            problems.append(Problem(where, f"{value!r:.60} is not allowed: {self.pattern_doc}"))
            return INVALID
        return value


class ListOf:
    """A TOML array, converted to a tuple (frozen configs hold no mutable lists)."""

    def __init__(self, item: Checker, min_len: int = 0, max_len: int = 64) -> None:
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if not isinstance(value, list):
            problems.append(Problem(where, f"expected an array, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        if not self.min_len <= len(value) <= self.max_len:
            problems.append(Problem(where, f"must hold {self.min_len} to {self.max_len} items, got {len(value)}"))
            return INVALID
        items = [self.item(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in items) else tuple(items)


class MapOf:
    """A TOML table of free-form keys (e.g. photo name -> face index), as sorted pairs."""

    def __init__(self, item: Checker, max_len: int = 16) -> None:
        self.item, self.max_len = item, max_len

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a table, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        if len(value) > self.max_len:
            problems.append(Problem(where, f"must hold at most {self.max_len} entries"))
            return INVALID
        items = {k: self.item(v, f"{where}.{key_text(k)}", problems) for k, v in value.items()}
        return INVALID if any(v is INVALID for v in items.values()) else tuple(sorted(items.items()))


class Either:
    """The first of several checkers that accepts the value (e.g. a count or an explicit list)."""

    def __init__(self, *options: Checker, doc: str) -> None:
        self.options, self.doc = options, doc

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        for option in self.options:
            trial: list[Problem] = []
            result = option(value, where, trial)
            if result is not INVALID:
                return result
        problems.append(Problem(where, f"expected {self.doc}, got {_type_name(value)} {value!r:.60}"))
        return INVALID


class Table:
    """A nested TOML table built into dataclass `cls`."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, value: Any, where: str, problems: list[Problem]) -> Any:
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a table, got {_type_name(value)} {value!r:.60}"))
            return INVALID
        return build(self.cls, value, where, problems)


class Tables(ListOf):
    """An array of tables (`[[render]]`), each built into dataclass `cls`."""

    def __init__(self, cls: type, min_len: int = 0, max_len: int = 64) -> None:
        super().__init__(Table(cls), min_len, max_len)


REQUIRED = dataclasses.MISSING


def build_section(cls: type, table: Any, section: str, where: str, *, only_known: bool = False) -> Any:
    """Build dataclass `cls` from a whole section of config.toml (`table`, e.g. its [daemon]),
    or raise ConfigError("invalid_config") naming every problem as '<where>: <section>.<key>'.
    `only_known`: keys that are not fields of `cls` are left for another reader, not refused."""
    from engine.errors import ConfigError

    problems: list[Problem] = []
    if not isinstance(table, Mapping):
        problems.append(Problem(section, "expected a table"))
        built: Any = INVALID
    else:
        if only_known:
            names = {known.name for known in dataclasses.fields(cls)}
            table = {key: value for key, value in table.items() if key in names}
        built = build(cls, table, section, problems)
    if problems or built is INVALID:
        problems = [Problem(f"{where}: {p.where}", p.reason) for p in problems]
        raise ConfigError("invalid_config", f"{where} has {len(problems)} problem(s): " + "; ".join(map(str, problems[:3])), problems=tuple(problems))
    return built


def build(cls: type, table: Mapping[str, Any], where: str, problems: list[Problem]) -> Any:
    """Build dataclass `cls` from `table`; every problem goes to `problems` with its key path.

    Returns INVALID when anything in this table was wrong (the caller still collects the
    problems of sibling tables, so the user sees them all at once).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    values: dict[str, Any] = {}
    ok = True
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(Problem(f"{prefix}{key_text(key)}", f"unknown key (known here: {known})"))
            ok = False
    for name, spec in fields.items():
        if name not in table:
            if spec.default is REQUIRED and spec.default_factory is REQUIRED:
                problems.append(Problem(f"{prefix}{name}", "required key is missing"))
                ok = False
            continue
        checker: Checker | None = spec.metadata.get("check")
        if checker is None:
            raise TypeError(f"{cls.__name__}.{name} has no checker")
        value = checker(table[name], f"{prefix}{name}", problems)
        if value is INVALID:
            ok = False
        else:
            values[name] = value
    if not ok:
        return INVALID
    return cls(**values)


def merge_tables(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two TOML tables: tables merge key by key, everything else (arrays too) is replaced."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_plain(value: Any) -> Any:
    """A frozen config back to plain JSON-able data (for the audit log and fingerprints)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


def from_plain(cls: type, plain: Mapping[str, Any]) -> Any:
    """A frozen config rebuilt from its plain form (to_plain's, as the audit log records a job's
    spec), for readers of a record: the values were checked when the job was loaded, so nothing
    is checked again. A key the record lacks (an older record) takes its default; a key the
    class no longer has is dropped. TypeError or KeyError when the record does not fit."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if not spec.init or spec.name not in plain:
            continue
        check, value = spec.metadata.get("check"), plain[spec.name]
        if isinstance(check, Tables):
            values[spec.name] = tuple(from_plain(check.item.cls, entry) for entry in value)
        elif isinstance(check, Table):
            values[spec.name] = from_plain(check.cls, value)
        else:
            values[spec.name] = _frozen(value)
    return cls(**values)


def _frozen(value: Any) -> Any:
    """Arrays back to tuples, as the checkers build them (a MapOf's pairs too)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value
