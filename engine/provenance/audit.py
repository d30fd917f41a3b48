"""Hash-chained audit log and job manifest (their verifier: engine.provenance.verification).

Each line of `audit.jsonl` is one structlog event rendered as canonical JSON with `ts`,
`job_id`, `event`, the event's fields, `fence` (the owner's fencing token: the generation of
the daemon's claim on the job when the line was written, 0 for `python -m engine run`), `prev`
(the previous line's `hash`; GENESIS for the first) and `hash` = sha256 of the canonical JSON of
the line without `hash`. Lines are appended with one write and fsynced, so a crash loses at most
the line being written; a torn last line is cut off at the next open and the cut is itself
recorded. Before each append the file must still end where this log's last line ended: a line
another process appended meanwhile (a daemon that lost its claim and did not know yet) stops
this writer (OwnershipLost) instead of forking the chain.

`manifest.json` lists the sha256 of every input (the job's `inputs/` copy of the dropped
folder), model and output file; the job's last event (`job_finished`) holds the manifest's own
sha256, so any edited input, output, manifest or audit line is found by
engine.provenance.verification.verify_audit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog

from engine.provenance.chain import GENESIS, chain_break, good_prefix
from engine.errors import OwnershipLost
from engine.fsutil import append_whole, atomic_write_json, canonical_json, check_write, fsync_dir, sha256_bytes, sha256_file, utf8_safe, walk_tree
from engine.layout import AUDIT_FILE, INPUTS_DIR, LEDGER_FILE, MANIFEST_FILE, SIGNATURE_FILE, WITNESS_FILE

MANIFEST_VERSION = 3  # 2: every file of the dropped folder is in inputs/ and listed under "inputs"; 3: signature.json, "trust"
# Called with (event name, fields) after each audit event and each progress report; the
# daemon turns these into metrics without the engine knowing about it.
Observer = Callable[[str, dict[str, Any]], None]
# Files of a job folder that the manifest does not list: the manifest itself, the log
# that holds the manifest's hash, the engine's working ledger, and the signed head of both.
UNLISTED = frozenset({AUDIT_FILE, MANIFEST_FILE, LEDGER_FILE, SIGNATURE_FILE, WITNESS_FILE})


def line_hash(record: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a record without its `hash` key."""
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k != "hash"}).encode("utf-8"))


def jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars/arrays, paths, tuples and non-finite floats; text
    that UTF-8 cannot hold (a file name in an old encoding) is escaped by `utf8_safe`."""
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, dict):
        return {utf8_safe(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return utf8_safe(str(value))
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return utf8_safe(str(value))


class _AppendOnlyFile:
    """structlog's 'logger': appends each rendered line, then fsyncs. A line is written whole
    or not at all: on a full disk write() first writes part of it and only the next call
    fails, so what was written is cut off again before the error goes up. `size` is where this
    writer's last line ended: a file of another size was written by someone else."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self.size = size

    def msg(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        self.size = append_whole(self._path, data, self._still_mine) + len(data)

    def _still_mine(self, start: int) -> None:
        if start != self.size:
            raise OwnershipLost(f"{self._path} holds {start} bytes where this writer left {self.size}: another process "
                                "appended to it (a second owner of the job)")

    info = warning = error = critical = debug = msg


# Called with (the chain's head hash, its number of lines) after each line a resume rebuilds its
# state from (WITNESSED_EVENTS) is written; returns what to append to the witness file, or None.
Witness = Callable[[str, int], "dict[str, Any] | None"]


class AuditLog:
    """Appends hash-chained events to one job's `audit.jsonl` (resuming an existing chain).

    With a `witness` (the signer's, when the lab has keys), every line a resume trusts
    (WITNESSED_EVENTS) is followed by the signer's signature over the chain's head and length,
    appended to `audit.witness` beside the log: a chain someone re-hashed on the share cannot carry
    those signatures, so a resume trusts only the prefix they cover (engine.provenance.verification.witnessed_prefix)."""

    def __init__(self, path: Path, job_id: str, observer: "Observer | None" = None, fence: int = 0,
                 witness: Witness | None = None) -> None:
        self.path = Path(path)
        self._observer = observer
        self._witness = witness
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        self.head, self.lines, torn = _recover_head(self.path)
        if new_file:
            fsync_dir(self.path.parent)
        self._file = _AppendOnlyFile(self.path, self.path.stat().st_size if self.path.exists() else 0)
        self._log = structlog.wrap_logger(
            self._file,
            processors=[self._stamp, self._chain],
            # Its own wrapper: the process's log level (e.g. `--log-level warning`) must never
            # filter audit events, which are all written at "info".
            wrapper_class=structlog.make_filtering_bound_logger(0),
            context_class=dict,
            cache_logger_on_first_use=False,
        ).bind(job_id=job_id, fence=fence)
        if torn is not None:
            self.event("audit_torn_line_removed", **torn)

    def event(self, event: str, **fields: Any) -> str:
        """Record one event; returns its hash (the new head of the chain). When the line
        cannot be written (OSError), the chain stays at the previous line."""
        previous = self.head
        try:
            self._log.info(event, **fields)
        except OSError:
            self.head = previous
            raise
        self.lines += 1
        if self._witness is not None and event in WITNESSED_EVENTS:
            entry = self._witness(self.head, self.lines)
            if entry is not None:
                append_whole(self.path.with_name(WITNESS_FILE), (canonical_json(entry) + "\n").encode("utf-8"))
        if self._observer is not None:
            self._observer(event, fields)
        return self.head

    @staticmethod
    def _stamp(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["ts"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        return event_dict

    def _chain(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
        record = jsonable(event_dict)
        record["prev"] = self.head
        record["hash"] = line_hash(record)
        self.head = record["hash"]
        return canonical_json(record)


def _recover_head(path: Path) -> tuple[str, int, dict[str, Any] | None]:
    """The last complete line's hash; a torn last line (a crash mid-write) is cut off.

    Returns (head, number of lines, facts about the removed bytes or None)."""
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS, 0, None
    data = path.read_bytes()
    torn = None
    keep = good_prefix(data)  # a torn last line, NUL padding, unreadable lines at the very end
    if keep < len(data):
        removed = data[keep:]
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        torn = {"removed_bytes": len(removed), "removed_sha256": sha256_bytes(removed)}
        data = data[:keep]
    lines = data.splitlines()
    if not lines:
        return GENESIS, 0, torn
    return json.loads(lines[-1])["hash"], len(lines), torn


@dataclass
class ChainRead:
    """What `read_chain` found: the lines a reader may trust, and where the chain broke."""

    records: list[dict[str, Any]] = field(default_factory=list)  # every line that continues the chain, in order
    broken_at: int | None = None  # 1-based number of the first line that does not (None: the chain is whole)
    problem: str = ""  # why that line does not continue the chain
    torn_tail: bool = False  # the last line had no newline (a write cut short, or a NUL-padded tail): left out


def read_chain(path: Path) -> ChainRead:
    """The lines of an audit log, each checked against the one before (the check of
    engine.provenance.verification.verify_audit), for a resume to rebuild its state from: bytes on the share are input.

    A last line without its newline (torn by a kill, or padded with NULs by the file system
    after a crash) is left out, as AuditLog's open cuts it off. Any other line that is not a
    JSON object continuing the chain ends the read there: `broken_at` names it, and only the
    lines before it are returned. A missing file is an empty chain."""
    read = ChainRead()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return read
    keep = good_prefix(data)  # what AuditLog's open cuts off: a torn last line, NUL padding, unreadable lines at the very end
    if keep < len(data):
        read.torn_tail = True
        data = data[:keep]
    prev = GENESIS
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            read.broken_at, read.problem = number, f"not a JSON object ({exc})"
            return read
        broken = chain_break(record, number, prev, line_hash)
        if broken:
            read.broken_at, read.problem = number, broken
            return read
        prev = record["hash"]
        read.records.append(record)
    return read


def set_aside_damaged(path: Path, read: ChainRead) -> dict[str, Any]:
    """Move an audit log whose chain breaks before its end (a line edited, removed or inserted:
    not a torn tail) aside as `audit.jsonl.damaged-<UTC time>`, never deleting it, and return
    what the fresh chain's first line (`audit_damaged`) records of it: its name, sha256, size,
    the first broken line and why, and how many lines before it verified."""
    path = Path(path)
    data = path.read_bytes()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    while target.exists():  # never over another damaged log
        stamp += "_"
        target = path.with_name(f"{path.name}.damaged-{stamp}")
    check_write(str(target))
    os.rename(path, target)
    fsync_dir(path.parent)
    return {"file": target.name, "sha256": sha256_bytes(data), "size": len(data), "broken_line": read.broken_at, "problem": read.problem,
            "lines_verified": len(read.records)}


# Audit events whose `files` ({relative path: sha256}) record what a stage run wrote and may read
# back on a resume (engine.context.StageContext.write_recorded / read_recorded).
RECORDING_EVENTS = frozenset({"train_checkpoint", "scratch_written"})
# The lines a resume rebuilds its state from (engine.ledger.Ledger.from_audit, recorded_files):
# with lab keys the signer witnesses the chain after each of them (AuditLog's `witness`).
WITNESSED_EVENTS = RECORDING_EVENTS | {"job_started", "job_resumed", "stage_started", "stage_finished", "stage_invalidated", "stages_dropped",
                                       "audit_damaged", "ledger_rebuilt", "unwitnessed_lines"}


def stage_run_records(records: list[dict[str, Any]], fingerprint: str) -> list[dict[str, Any]]:
    """The lines of the latest run of the stage whose fingerprint is `fingerprint`: from the
    `stage_started` line that began it to the next line that started another (of any stage or
    fingerprint), or to the end. A `stage_started` line with `continues` true went on with the
    interrupted run before it (its scratch was kept), so the run began at the first of such a
    series. Empty when no line started it."""
    start = None
    for index in range(len(records) - 1, -1, -1):
        record = records[index]
        if record.get("event") == "stage_started" and record.get("fingerprint") == fingerprint:
            start = index
            if record.get("continues") is not True:
                break
    if start is None:
        return []
    end = next((index for index in range(start + 1, len(records)) if records[index].get("event") == "stage_started"
                and (records[index].get("fingerprint") != fingerprint or records[index].get("continues") is not True)), len(records))
    return records[start:end]


def recorded_files(records: list[dict[str, Any]], fingerprint: str) -> dict[str, str]:
    """Relative path -> sha256, as the running stage run last recorded each file it wrote."""
    files: dict[str, str] = {}
    for record in stage_run_records(records, fingerprint):
        if record.get("event") in RECORDING_EVENTS and isinstance(record.get("files"), dict):
            files.update({str(rel): str(digest) for rel, digest in record["files"].items()})
    return files


def _outputs(job_dir: Path) -> dict[str, str]:
    """Every output file of a job folder (not its inputs/, not the unlisted files) -> sha256."""
    return {entry.rel: sha256_file(Path(entry.path)) for entry in walk_tree(job_dir)
            if entry.kind == "file" and entry.rel not in UNLISTED and not entry.rel.startswith(INPUTS_DIR + "/") and not entry.name.endswith(".tmp")}


def write_manifest(job_dir: Path, job_id: str, inputs: dict[str, str], models: dict[str, str], demo: bool, trust: dict[str, Any], *,
                   kind: str, families: dict[str, str] | None = None) -> str:
    """Hash every output file of the job folder into manifest.json; returns its sha256.

    `inputs` is the Listing of the job's inputs/ (rel path -> sha256, "dir" or "link:<target>");
    `trust` who signs the job (engine.provenance.trust: a key fingerprint and the content signer, or unsigned);
    `families` the family of each diffusion model the job used (role -> "sd", "sdxl": engine.diffusion.families)."""
    manifest = {"version": MANIFEST_VERSION, "job_id": job_id, "kind": kind, "demo": demo, "trust": trust, "inputs": inputs, "models": models,
                **({"families": families} if families else {}), "outputs": _outputs(job_dir)}
    atomic_write_json(job_dir / MANIFEST_FILE, manifest)
    return sha256_file(job_dir / MANIFEST_FILE)

