"""Hypothesis strategies and checks shared by the fuzz tests.

The one property every fuzz test checks: bad input gives a `JobError` with a stable code whose
message names the file or key; good input gives a correct result; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from engine.provenance.audit import AUDIT_FILE
from engine.errors import JobError, Problem
from engine.fsutil import canonical_json
from engine.job import JOB_FILE, LoadedJob, load_job
from engine.kinds.replicate import JobSpec
from engine.kinds.sections import SAFE_NAME
from engine.schema import Table, Tables, to_plain
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_JOB

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DENYLIST = ("nsfw", "cartoon")
IMAGE_CODES = {"unreadable_image", "truncated_image", "unsupported_image", "pixel_limit", "empty_file"}
JOB_CODES = {"invalid_job", "missing_job_file"}
# A refusal is read by a person: it may quote a key or a value, but never pages of them.
MAX_MESSAGE_CHARS = 4000

BASE_TABLE: dict[str, Any] = tomllib.loads(FAST_JOB)


def _leaf_paths(cls: type, prefix: tuple) -> list[tuple]:
    """Every key path of a job's schema: ("train", "phases", 0, "lr"), ("render", 1, "prompt")..."""
    paths: list[tuple] = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if isinstance(check, Tables):
            for index in (0, 1):
                paths += _leaf_paths(check.item.cls, prefix + (f.name, index))
        elif isinstance(check, Table):
            paths += _leaf_paths(check.cls, prefix + (f.name,))
        else:
            paths.append(prefix + (f.name,))
    return paths


KEY_PATHS = _leaf_paths(JobSpec, ())
SECTION_PATHS = [("subject",), ("prepare",), ("train",), ("train", "phases"), ("verify",), ("render",), ("render", 0), ("train", "phases", 1)]
KNOWN_KEYS = sorted({p for path in KEY_PATHS for p in path if isinstance(p, str)})

# ---- TOML values -----------------------------------------------------------------------

keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=12), st.text(min_size=200, max_size=400))
plain_text = st.text(max_size=40)
plausible_strings = st.sampled_from([
    "", "auto", "largest", "mse", "huber", "charbonnier", "adamw", "adamp", "three_pass", "two_pass", "COARSE", "FINE",
    "MID_FINE", "a.png", "b.png", "../a.png", "/etc/passwd", "a photo of sks person", "nsfw", "Cartoon style", "é.png",
    "a\u0000.png", "sub/a.png", ".", "..", " ", "x" * 1001, "\U0001F600", "a.PNG",
])
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=3000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    plain_text,
    plausible_strings,
    st.datetimes(min_value=dt.datetime(1, 1, 1), timezones=st.none() | st.just(dt.timezone.utc)),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


def set_path(table: Any, path: tuple, value: Any) -> None:
    """Set `value` at `path`, creating tables (or growing arrays) on the way; a wrong-typed
    container on the way is replaced, since that is just another mutation."""
    node = table
    for step, following in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(step, int):
            while len(node) <= step:
                node.append({} if not isinstance(following, int) else [])
            if not isinstance(node[step], type(empty)):
                node[step] = empty
        elif not isinstance(node.get(step), type(empty)):
            node[step] = empty
        node = node[step]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append({})
    node[last] = value


def delete_path(table: Any, path: tuple) -> None:
    node = table
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    try:
        del node[path[-1]]
    except (KeyError, IndexError, TypeError):
        pass


def path_name(path: tuple) -> str:
    """("train", "phases", 0, "lr") -> "train.phases[0].lr", the way problems spell it."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


# ---- the checks --------------------------------------------------------------------------


def check_error(error: JobError, codes: set[str], names: tuple[str, ...]) -> None:
    """A clear error: a stable code, a bounded message naming one of `names`, JSON-able."""
    assert error.code in codes, f"unexpected code {error.code}: {error.message[:300]}"
    assert error.message and len(error.message) <= MAX_MESSAGE_CHARS, f"message of {len(error.message)} characters"
    assert any(name in error.message for name in names), f"{error.message[:300]!r} names none of {names}"
    for problem in error.problems:
        assert len(str(problem)) <= MAX_MESSAGE_CHARS, f"problem of {len(str(problem))} characters: {str(problem)[:200]}"
    # error.json is written with these options: it must always be writable.
    json.dumps(error.to_dict(), ensure_ascii=False, allow_nan=False).encode("utf-8")


def check_loaded(job: LoadedJob, folder: Path) -> None:
    """A correct result: a safe subject name, photos that are regular files inside the folder,
    and a spec that goes into the audit log as canonical JSON."""
    assert re.fullmatch(SAFE_NAME, job.subject)
    root = folder.resolve()
    assert 1 <= len(job.photos) <= 3
    for name, path in zip(job.spec.subject.photos, job.photos):
        assert path.is_file() and path.resolve().is_relative_to(root)
        assert (folder / name).resolve() == path.resolve()
    canonical_json(to_plain(job.spec))


def load_or_refuse(folder: Path, job_defaults: dict[str, Any] | None = None) -> LoadedJob | JobError:
    """load_job, with anything but a JobError escaping (which fails the test)."""
    try:
        job = load_job(folder, job_defaults or {}, EXTENSIONS, DENYLIST)
    except JobError as error:
        return error
    check_loaded(job, folder)
    return job


def write_job(folder: Path, table_or_text: dict[str, Any] | str | bytes) -> Path:
    from tests.harness.toml_writer import dumps

    folder.mkdir(parents=True, exist_ok=True)
    data = table_or_text
    if isinstance(data, dict):
        data = dumps(data)
    if isinstance(data, str):
        data = data.encode("utf-8")
    (folder / JOB_FILE).write_bytes(data)
    return folder


def tree_snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` -> a file's bytes, "-> target" for a link, "<dir>" for a
    folder, "<special>" for a pipe or device. Links are never followed."""
    snapshot: dict[str, bytes | str] = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent) / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                snapshot[relative] = "-> " + os.readlink(path)
            elif path.is_dir():
                snapshot[relative] = "<dir>"
            elif path.is_file():
                snapshot[relative] = path.read_bytes()
            else:
                snapshot[relative] = "<special>"
    return snapshot


def check_failed_copy(result: Any, before: dict[str, bytes | str], codes: set[str], names: tuple[str, ...]) -> dict[str, Any]:
    """A job the engine refused: outcome "failed", a clear error, and in failed/<subject>/<id>/
    inputs/ holding the folder exactly as dropped (links as links, pipes left out) beside
    error.json and audit.jsonl. Returns error.json."""
    assert result.outcome == "failed", result
    error = json.loads((result.output_dir / "error.json").read_text(encoding="utf-8"))
    assert error == json.loads(json.dumps(result.error)), "error.json differs from the result's error"
    check_error(JobError(error["code"], error["message"], tuple(Problem(**p) for p in error["problems"])), codes, names)
    assert sorted(p.name for p in result.output_dir.iterdir()) == [AUDIT_FILE, "error.json", "inputs", "manifest.json", "signature.json"]
    copied = tree_snapshot(result.output_dir / "inputs")
    expected = {k: v for k, v in before.items() if v != "<special>"}
    assert copied == expected, f"failed/ holds {sorted(copied)}, the job folder held {sorted(expected)}"
    assert sorted(error["details"].get("not_copied", [])) == sorted(k for k, v in before.items() if v == "<special>")
    # The failed job's record verifies as one: its chain, its manifest over inputs/, error.json and the log, its head.
    report = verify_audit(result.output_dir)
    assert report.ok and report.verdict == "failed", report.problems
    return error
