"""Verification: everything that checks a job's or an outbox's records, apart from the code that
writes them (engine.provenance.audit writes the chain and the manifest, engine.provenance.trust the signed heads and
the journal, engine.provenance.credentials the images' Content Credentials).

- `verify_audit(job_dir)`: the audit chain line by line, every file the manifest lists, the
  job's inputs/, its signed head, its journal line and its images' C2PA state
  (`python -m engine verify-audit`).
- `verify_journal(outbox)`: the outbox as a whole, the journal's chain and signatures and every
  job it names (`python -m engine verify-journal`).
- `trusted_records(...)`: the lines of a job's own chain a resume may rebuild its state from
  (the signer's witnesses over it).

Apart so that the writers do not import each other in a cycle: this module imports them (their
names, statements and readers); none of them imports this one.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from engine import layout
from engine.provenance.audit import MANIFEST_VERSION, UNLISTED, line_hash
from engine.provenance.chain import GENESIS, chain_break
from engine.fsutil import Listing, canonical_json, sha256_file, tree_listing, walk_tree
from engine.layout import failure_staging, work_dir
from engine.layout import AUDIT_FILE, ERROR_FILE, INPUTS_DIR, MANIFEST_FILE, SIGNATURE_FILE
from engine.provenance.trust import (build_statement, fingerprint, journal_line_hash, journal_path, read_journal, statement_sha256, torn_tail,
                          witness_statement)


# ---------------------------------------------------------------------------- one job

@dataclass
class AuditReport:
    """What `verify_audit` found. `ok` only when `problems` is empty."""

    job_dir: Path
    lines: int = 0
    head: str = GENESIS
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trust: TrustFindings | None = None  # the signed head, the journal line, the images' Content Credentials
    verdict: str = "finished"  # "finished": a published job; "failed": a failed job's record (inputs/, error.json, audit log)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_audit(job_dir: Path, *, trusted_key: Any = None, trusted_ca: bytes | None = None, journal: bool = True,
                 allow_unsigned: bool = False) -> AuditReport:
    """Check the audit chain line by line, every file listed in the manifest, the job's inputs/,
    and its signed records (engine.provenance.trust): the signed head against `trusted_key` (an Ed25519
    public key; None: only against the key it names), the outbox's journal line (`journal`), and
    every generated image's Content Credentials against the lab CA `trusted_ca` (PEM). With a
    `trusted_key`, an unsigned head is a problem unless `allow_unsigned`.

    A failed job (error.json, no job_finished) is checked as one (`verdict` "failed"): its
    manifest against its inputs/, error.json and audit log, the inputs against what its audit log
    recorded, all of it sealed by its signed head.

    Names the first broken line (1-based) and each changed, missing or unlisted file.
    """
    job_dir = Path(job_dir)
    report = AuditReport(job_dir=job_dir)
    audit_path = job_dir / AUDIT_FILE
    if not audit_path.is_file():
        report.problems.append(f"{AUDIT_FILE} is missing")
        return report
    prev = GENESIS
    finished: dict[str, Any] | None = None
    job_ids: set[str] = set()
    fence = 0
    raw_lines = audit_path.read_bytes().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    else:
        report.problems.append(f"{AUDIT_FILE}: the last line is not terminated (torn write)")
    for number, raw in enumerate(raw_lines, start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            report.problems.append(f"{AUDIT_FILE} line {number}: not a JSON object ({exc})")
            break
        broken = chain_break(record, number, prev, line_hash)
        if broken:
            report.problems.append(f"{AUDIT_FILE} line {number}: {broken}")
            break
        prev = record["hash"]
        job_ids.add(str(record.get("job_id")))
        report.lines = number
        line_fence = record.get("fence", 0)
        if isinstance(line_fence, int) and line_fence < fence:
            report.problems.append(f"{AUDIT_FILE} line {number}: written by the job's owner of generation {line_fence} after one of generation "
                                   f"{fence} (a daemon that had lost its claim kept writing)")
        elif isinstance(line_fence, int):
            fence = line_fence
        if record.get("event") == "job_finished":
            finished = record
    report.head = prev
    if report.problems:
        return report
    if len(job_ids) > 1:
        report.problems.append(f"{AUDIT_FILE}: lines of several jobs ({', '.join(sorted(job_ids))})")
    manifest_path = job_dir / MANIFEST_FILE
    if finished is None:
        if (job_dir / ERROR_FILE).is_file():  # a failed job: its signed head seals its manifest, error.json and the log
            _verify_failed(job_dir, report)
            report.trust = check_job(job_dir, where="failed", audit_head_now=report.head, audit_lines_now=report.lines, manifest=None,
                                     trusted_key=trusted_key, trusted_ca=trusted_ca, journal=journal, allow_unsigned=allow_unsigned)
            report.problems += report.trust.problems
        else:
            report.problems.append(f"{AUDIT_FILE}: no job_finished event (job incomplete)")
        return report
    if not manifest_path.is_file():
        report.problems.append(f"{MANIFEST_FILE} is missing")
        return report
    if sha256_file(manifest_path) != finished.get("manifest_sha256"):
        report.problems.append(f"{MANIFEST_FILE} changed: its sha256 differs from the one in the audit log's job_finished event")
        return report
    manifest = json.loads(manifest_path.read_text("utf-8"))
    for rel, expected in sorted(manifest.get("outputs", {}).items()):
        path = job_dir / rel
        report.files_checked += 1
        if not path.is_file():
            report.problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            report.problems.append(f"{rel}: changed (sha256 differs from manifest)")
    listed = set(manifest.get("outputs", {}))
    for entry in walk_tree(job_dir):
        unlisted = entry.rel in UNLISTED or entry.rel.startswith(INPUTS_DIR + "/") or entry.rel in listed
        if entry.kind in ("file", "link", "special") and not unlisted:
            report.problems.append(f"{entry.rel}: not in the manifest (added after the job finished)")
    _verify_inputs(job_dir, manifest, report)
    report.trust = check_job(job_dir, where="outbox", audit_head_now=report.head, audit_lines_now=report.lines, manifest=manifest,
                             trusted_key=trusted_key, trusted_ca=trusted_ca, journal=journal, allow_unsigned=allow_unsigned)
    report.problems += report.trust.problems
    return report


def _verify_inputs(job_dir: Path, manifest: dict[str, Any], report: AuditReport) -> None:
    """The job's inputs/ holds exactly what the manifest lists: the folder as it was dropped."""
    if manifest.get("version", 1) < 2:
        return  # made before inputs/ was kept: only the hashes of the used inputs were recorded
    expected = manifest.get("inputs", {})
    found = tree_listing(job_dir / INPUTS_DIR).entries if (job_dir / INPUTS_DIR).is_dir() else {}
    report.files_checked += sum(1 for value in expected.values() if value != "dir" and not value.startswith("link:"))
    differences = Listing(expected).differences(Listing(found))
    report.problems += [f"{INPUTS_DIR}/{rel}: missing (the manifest lists it as dropped)" for rel in differences["removed"]]
    report.problems += [f"{INPUTS_DIR}/{rel}: not in the manifest's inputs (added after the job finished)" for rel in differences["added"]]
    report.problems += [f"{INPUTS_DIR}/{rel}: changed (differs from the manifest's inputs)" for rel in differences["changed"]]


# Files of a failed job's folder besides inputs/ (its manifest lists error.json and the audit log).
FAILED_FILES = frozenset({ERROR_FILE, AUDIT_FILE, MANIFEST_FILE, SIGNATURE_FILE})


def _verify_failed(job_dir: Path, report: AuditReport) -> None:
    """A failed job's record: its manifest (engine.jobfolder.failed_manifest) against inputs/,
    error.json and the audit log; no other file; and inputs/ against the inputs its audit log
    recorded (the last job_started / job_resumed / job_refused line that lists them). Older
    failed folders (no manifest) are checked by their signed head alone, and say so."""
    report.verdict = "failed"
    manifest_path = job_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        report.notes.append(f"a failed job recorded before failed jobs had a {MANIFEST_FILE}: its inputs/ are not sealed (only error.json "
                            "and the audit log are)")
        return
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
        if not isinstance(manifest, dict) or not manifest.get("failed"):
            raise ValueError("not a failed job's manifest")
    except ValueError as exc:
        report.problems.append(f"{MANIFEST_FILE}: unreadable ({exc})")
        return
    for rel, expected in sorted((manifest.get("outputs") or {}).items()):
        report.files_checked += 1
        path = job_dir / rel
        if not path.is_file():
            report.problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            report.problems.append(f"{rel}: changed (sha256 differs from the failed job's manifest)")
    listed = FAILED_FILES | set(manifest.get("outputs") or {})
    for entry in walk_tree(job_dir):
        if entry.rel.startswith(INPUTS_DIR + "/") or entry.rel in listed or entry.kind == "dir":
            continue
        report.problems.append(f"{entry.rel}: not in the failed job's manifest (added after it failed)")
    _verify_inputs(job_dir, {"version": MANIFEST_VERSION, "inputs": manifest.get("inputs") or {}}, report)
    recorded = _recorded_inputs(job_dir / AUDIT_FILE)
    if recorded is not None and not manifest.get("only") and recorded != (manifest.get("inputs") or {}):
        differences = Listing(recorded).differences(Listing(manifest.get("inputs") or {}))
        report.problems.append(f"{INPUTS_DIR}/: differs from the inputs the audit log recorded ({differences})")


def _recorded_inputs(audit: Path) -> dict[str, str] | None:
    """The inputs listing of the audit log's last line that records one (None: none does)."""
    recorded = None
    for raw in audit.read_bytes().splitlines():
        record = json.loads(raw)
        if record.get("event") in ("job_started", "job_resumed", "job_refused") and record.get("inputs"):
            recorded = record["inputs"]
    return recorded


# ---------------------------------------------------------------------------- its signed records

@dataclass
class TrustFindings:
    """What the signed records say of one job folder (part of `verify_audit`)."""

    signed: str = "unsigned"  # trusted | signed (valid, no trusted key given) | unsigned | forged | missing | older (no signed heads yet)
    key_fingerprint: str | None = None
    journal: str = "not checked"  # found | missing | not checked
    credentials: dict[str, int] = field(default_factory=dict)  # C2PA validation state -> images
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_job(job_dir: Path, *, where: str, audit_head_now: str, audit_lines_now: int, manifest: dict[str, Any] | None,
              trusted_key: ed25519.Ed25519PublicKey | None, trusted_ca: bytes | None, journal: bool, allow_unsigned: bool = False) -> TrustFindings:
    """The job's signed head against the folder it is in (its path, job id, subject, audit log,
    manifest, error.json), the outbox's journal line, and every generated image's C2PA state.

    Trusted means required: with a `trusted_key`, an unsigned head is a problem (unless
    `allow_unsigned`). Images that carry Content Credentials in a job whose head is unsigned are a
    problem whatever was given: only a job made with lab keys has them, so its head's signature
    was stripped."""
    job_dir = Path(job_dir)
    found = TrustFindings()
    path = job_dir / SIGNATURE_FILE
    if not path.is_file():
        if manifest is not None and manifest.get("version", 1) < 3:
            found.signed = "older"
            found.notes.append("made before jobs had signed heads: checked by its hash chain only")
        else:
            found.signed = "missing"
            found.problems.append(f"{SIGNATURE_FILE} is missing (the job's signed head: removed?)")
        return found
    document = json.loads(path.read_text("utf-8"))
    found.signed, problems = check_signature(document, trusted_key)
    found.problems += problems
    found.key_fingerprint = document.get("key_fingerprint")
    statement = document.get("statement") or {}
    rel = f"{job_dir.parent.name}/{job_dir.name}"
    if isinstance(statement.get("version"), int) and statement["version"] >= 2:
        expected = build_statement(job_dir, where=where, path=rel, job_id=job_dir.name, subject=job_dir.parent.name)
        expected.pop("version")
    else:  # version 1: the audit head line's hash
        expected = {"where": where, "path": rel, "job_id": job_dir.name, "subject": job_dir.parent.name,
                    "audit_head": audit_head_now, "audit_lines": audit_lines_now}
        sealed, key = (MANIFEST_FILE, "manifest_sha256") if where == "outbox" else (ERROR_FILE, "error_sha256")
        expected[key] = sha256_file(job_dir / sealed) if (job_dir / sealed).is_file() else None
    for name, value in expected.items():
        if statement.get(name) != value:
            found.problems.append(f"{SIGNATURE_FILE}: the signed {name} is {statement.get(name)!r}, the folder's is {value!r}" +
                                  _what_it_means(name))
    if found.signed == "unsigned":
        if trusted_key is not None and not allow_unsigned:
            found.problems.append(f"{SIGNATURE_FILE}: the job's head is unsigned, but a trusted key was given: anyone who can write the "
                                  "share could have rewritten this job consistently (--allow-unsigned accepts unsigned jobs)")
        else:
            found.notes.append("UNSIGNED: no lab key signed this job; its records are hash-chained, which shows an edited byte, but "
                               "someone who can write the share could rewrite them consistently")
    elif found.signed == "signed":
        found.notes.append(f"signed by key {found.key_fingerprint}, not checked against a trusted key (give --trusted-key, or [trust] keys)")
    journal_file = journal_path(job_dir.parent.parent)
    if journal and where == "outbox" and not journal_file.is_file():
        found.journal = "not found"
        found.notes.append(f"no journal at {journal_file} (the folder was checked on its own, away from its outbox; "
                           "`verify-journal OUTBOX` checks the outbox as a whole)")
    elif journal and where == "outbox":
        digest = statement_sha256(statement)
        if any(line.get("statement_sha256") == digest for line in read_journal(journal_file)):
            found.journal = "found"
        else:
            found.journal = "missing"
            found.problems.append(f"not in the outbox's journal ({journal_file}): published by hand, or the journal was cut back or replaced")
    if manifest is not None and where == "outbox":
        _check_credentials(job_dir, manifest, trusted_ca, found)
    return found


def _what_it_means(name: str) -> str:
    return {
        "path": " (the folder was moved or swapped with another)",
        "job_id": " (the folder was renamed or swapped)",
        "subject": " (the folder was moved under another subject)",
        "audit_head": " (audit.jsonl was rewritten after it was signed)",
        "audit_lines": " (audit.jsonl was rewritten after it was signed)",
        "audit_sha256": " (audit.jsonl was rewritten after it was signed)",
        "manifest_sha256": " (manifest.json was rewritten after it was signed)",
        "error_sha256": " (error.json was rewritten after it was signed)",
        "where": " (moved between the outbox and failed/)",
    }.get(name, "")


def check_signature(document: dict[str, Any], trusted: ed25519.Ed25519PublicKey | None) -> tuple[str, list[str]]:
    """("trusted" | "signed" (valid, but no trusted key to check against) | "unsigned", problems)."""
    if document.get("signature") is None:
        return "unsigned", []
    try:
        embedded = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(document.get("public_key") or ""))
        key = trusted or embedded
        key.verify(base64.b64decode(document["signature"]), canonical_json(document.get("statement")).encode("utf-8"))
    except (InvalidSignature, ValueError, TypeError) as exc:
        who = f"the trusted key {fingerprint(trusted)[:16]}" if trusted else "the key it names"
        return "forged", [f"{SIGNATURE_FILE}: the signature does not verify with {who} ({type(exc).__name__}): the statement was "
                          "changed, or signed by another key"]
    return ("trusted" if trusted else "signed"), []


GENERATED_IMAGE_FOLDERS = tuple(f"{folder}/" for folder in layout.GENERATED_IMAGE_DIRS)


def _check_credentials(job_dir: Path, manifest: dict[str, Any], trusted_ca: bytes | None, found: TrustFindings) -> None:
    """Every image the model generated carries Content Credentials of the lab (signed jobs only)."""
    signed_job = bool((manifest.get("trust") or {}).get("signed"))
    carrying: list[str] = []
    for rel in sorted(manifest.get("outputs", {})):
        if not rel.endswith(".png") or not rel.startswith(GENERATED_IMAGE_FOLDERS) or not (job_dir / rel).is_file():
            continue
        state, _manifest, detail = read_credentials(job_dir / rel, trusted_ca)
        found.credentials[state] = found.credentials.get(state, 0) + 1
        if state in ("Trusted", "Valid"):
            carrying.append(rel)
        if not signed_job:
            continue
        if state == "none":
            found.problems.append(f"{rel}: carries no Content Credentials ({detail}; re-saved without them?)")
        elif state == "Invalid":
            found.problems.append(f"{rel}: its Content Credentials do not validate ({detail or 'tampered'})")
        elif state == "Valid" and trusted_ca is not None:
            found.problems.append(f"{rel}: its Content Credentials are signed, but not under the lab CA (another signer's certificate)")
    if carrying and (found.signed == "unsigned" or not signed_job):
        found.problems.append(f"{len(carrying)} image(s) carry signed Content Credentials ({carrying[0]}, ...), but the job's "
                              f"{'head is unsigned' if found.signed == 'unsigned' else 'manifest says it is unsigned'}: only a job made with "
                              "lab keys has them, so a signature was stripped or the records were rewritten")
    if signed_job and trusted_ca is None and found.credentials:
        found.notes.append("Content Credentials checked for integrity only: give --trusted-ca (the lab CA) to require the lab's signature")


def read_credentials(path: Path, trusted_ca: bytes | None) -> tuple[str, dict[str, Any] | None, str]:
    """(validation state, the active manifest, what is wrong) of a PNG. The state is c2pa's:
    "Trusted" (signed under `trusted_ca`), "Valid" (intact, someone else's certificate: or no CA
    given), "Invalid", or "none" when the file carries no Content Credentials."""
    import c2pa  # on first use: checking a job without images needs no C2PA library

    from engine.provenance.credentials import SETTINGS

    settings = dict(SETTINGS)
    if trusted_ca is not None:
        settings["trust"] = {"user_anchors": trusted_ca.decode("ascii")}
    try:
        with open(path, "rb") as handle:
            reader = c2pa.Reader("image/png", handle, context=c2pa.Context.from_dict(settings))
            state = reader.get_validation_state() or "none"
            manifest = reader.get_active_manifest()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as exc:
        text = str(exc)
        if "ManifestNotFound" in type(exc).__name__ or "not found" in text.lower():
            return "none", None, "no Content Credentials in the file"
        return "Invalid", None, f"{type(exc).__name__}: {text[:200]}"
    failures = [item.get("code", "?") for item in (results.get("activeManifest") or {}).get("failure", [])] if isinstance(results, dict) else []
    return state, manifest, ", ".join(failures)


# ---------------------------------------------------------------------------- the outbox's journal

@dataclass
class JournalReport:
    """What `verify_journal` found. `ok` only when `problems` is empty."""

    outbox: Path
    entries: int = 0
    head: str = GENESIS
    signed: str = "unsigned"  # trusted | signed | unsigned | mixed
    jobs_checked: int = 0
    repairs: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_journal(outbox: Path, failed: Path | None = None, *, trusted: ed25519.Ed25519PublicKey | None = None,
                   trusted_ca: bytes | None = None, allow_unsigned: bool = False) -> JournalReport:
    """Check an outbox as a whole: the journal's chain and signatures; every journal entry's job
    folder exists where the entry says, holds the very head the journal recorded, and passes
    verify_audit (a failed job as a failed job: its inputs/ against its sealed manifest); every
    job folder of the outbox (and of `failed`, default failed/ beside it) is in the journal. Names
    a deleted job, swapped folders, a folder put back from another version, a torn tail.

    With a `trusted` key, signed is required: an unsigned line (one after a signed one above all:
    a downgrade) is a problem, unless `allow_unsigned`."""
    outbox = Path(outbox)
    failed = Path(failed) if failed is not None else outbox.parent / "failed"
    roots = {"outbox": outbox, "failed": failed}
    report = JournalReport(outbox=outbox)
    path = journal_path(outbox)
    lines = read_journal(path)
    report.entries = len(lines)
    prev, states, latest, first_signed = GENESIS, set(), {}, None
    for number, line in enumerate(lines, start=1):
        if "unreadable" in line:
            report.problems.append(f"journal line {number}: not JSON ({line['unreadable']!r})")
            break
        broken = chain_break(line, number, prev, journal_line_hash)
        if broken:
            report.problems.append(f"journal line {number}: {broken}")
            break
        prev = line["hash"]
        state, problems = _check_line(line, trusted)
        states.add(state)
        report.problems += [f"journal line {number}: {problem}" for problem in problems]
        if state != "unsigned" and first_signed is None:
            first_signed = number
        elif state == "unsigned" and first_signed is not None and trusted is not None and not allow_unsigned:
            report.problems.append(f"journal line {number}: unsigned, after signed lines from line {first_signed} on (a signature "
                                   "stripped, or keys taken out of the configuration); --allow-unsigned accepts it")
        if line.get("kind") == "repair":
            report.repairs += 1
            repair = line.get("repair") or {}
            report.notes.append(f"journal line {number}: a torn tail of {repair.get('removed_bytes')} bytes was cut off and kept as "
                                f"{repair.get('kept_as')} (a power cut or a lost write on the share)")
            continue
        latest[(line.get("where"), line.get("path"))] = (number, line)
    report.head = prev
    report.signed = states.pop() if len(states) == 1 else ("mixed" if states else "unsigned")
    if trusted is not None and not allow_unsigned and report.entries and first_signed is None:
        report.problems.append("the journal is unsigned, but a trusted key was given: its lines could have been rewritten by anyone "
                               "who can write the share (--allow-unsigned accepts an unsigned journal)")
    torn = torn_tail(path)
    if torn:
        report.problems.append(f"the journal ends in {torn} bytes that are not a whole line (torn by a power cut or a lost write, or "
                               "added by hand); the next job the daemon publishes repairs it, keeping the bytes aside")
    for (where, rel), (number, line) in sorted(latest.items(), key=lambda item: item[1][0]):
        folder = roots.get(where, outbox) / str(rel)
        label = f"{where}:{rel}"
        if not (folder / SIGNATURE_FILE).is_file():
            job_id, subject = str(line.get("job_id")), folder.parent.name
            pending = work_dir(outbox, job_id) if where == "outbox" else failure_staging(folder.parent.parent, subject, job_id)
            if not folder.exists() and (pending / SIGNATURE_FILE).is_file():
                report.problems.append(f"journal line {number}: {label}: sealed but not published yet ({pending} holds it: a run was stopped "
                                       "between the seal and its publishing rename; the next run of the job publishes it as sealed)")
            else:
                report.problems.append(f"journal line {number}: {label}: the job folder is missing (deleted?)" if not folder.exists()
                                       else f"journal line {number}: {label}: the job folder has no {SIGNATURE_FILE}")
            continue
        document = json.loads((folder / SIGNATURE_FILE).read_text("utf-8"))
        held = document.get("statement") or {}
        if statement_sha256(held) != line.get("statement_sha256"):
            if (held.get("where"), held.get("path")) != (where, rel):
                report.problems.append(f"journal line {number}: {label} holds the job recorded as {held.get('where')}:{held.get('path')} "
                                       "(folders swapped or moved?)")
            else:
                report.problems.append(f"journal line {number}: {label} holds another version of the job than the journal recorded "
                                       "(put back from an older copy, or rewritten?)")
            continue
        report.jobs_checked += 1
        audit = verify_audit(folder, trusted_key=trusted, trusted_ca=trusted_ca, journal=False, allow_unsigned=allow_unsigned)
        report.problems += [f"{label}: {problem}" for problem in audit.problems]
    for where, root in roots.items():
        if not root.is_dir():
            continue
        for subject in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for job in sorted(p for p in subject.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if (where, f"{subject.name}/{job.name}") not in latest:
                    report.problems.append(f"{where}:{subject.name}/{job.name}: not in the journal (added by hand, or the journal was "
                                           "cut back)")
    return report


def _check_line(line: dict[str, Any], trusted: ed25519.Ed25519PublicKey | None) -> tuple[str, list[str]]:
    """The line's own signature and, for a job's line, the statement's."""
    if line.get("signature") is None:
        return "unsigned", []
    key = trusted
    if key is None:
        return "signed", []  # a reviewer's key is what makes a line trusted; without it only the chain is checked
    problems = []
    try:
        key.verify(base64.b64decode(line["signature"]), journal_line_hash(line).encode("ascii"))
    except (InvalidSignature, ValueError, TypeError):
        problems.append("the line's signature does not verify with the trusted key (edited, or signed by another key)")
    if line.get("kind") != "repair":
        try:
            key.verify(base64.b64decode(line.get("statement_signature") or ""), canonical_json(line.get("statement")).encode("utf-8"))
        except (InvalidSignature, ValueError, TypeError):
            problems.append("the job's signed head in it does not verify with the trusted key")
    return ("trusted" if not problems else "forged"), problems


# ---------------------------------------------------------------------------- a resume's trust in its own chain

def trusted_records(records: list[dict[str, Any]], witness_path: Path, job_id: str, public_key: Any) -> tuple[list[dict[str, Any]],
                                                                                                             tuple[int, int] | None]:
    """The lines of the checked chain `records` a resume may rebuild its state from, and the
    (first, last) line numbers of the suffix no witness covers (None when every line is covered).

    Without a lab key (`public_key` None) every line: an unsigned job's work area is as
    trustworthy as its share. With one: the witnessed prefix (`witnessed_prefix`), less the
    ranges an earlier resume found unwitnessed and declared so (`unwitnessed_lines`, itself
    witnessed): later witnesses cover those lines too, as the chain runs through them."""
    if public_key is None:
        return list(records), None
    covered = witnessed_prefix(records, witness_path, job_id, public_key)
    excluded: set[int] = set()
    for record in records[:covered]:
        if record.get("event") == "unwitnessed_lines" and isinstance(record.get("from_line"), int) and isinstance(record.get("to_line"), int):
            excluded.update(range(record["from_line"], record["to_line"] + 1))
    trusted = [record for number, record in enumerate(records[:covered], start=1) if number not in excluded]
    return trusted, ((covered + 1, len(records)) if covered < len(records) else None)


def witnessed_prefix(records: list[dict[str, Any]], witness_path: Path, job_id: str, public_key: Any) -> int:
    """How many leading lines of the checked chain `records` the signer witnessed: the longest
    prefix whose last line's hash a witness entry (engine.provenance.trust.witness_statement, signed with the
    lab key `public_key`) names at that length. 0 when none does: no witness file, or entries
    someone wrote who holds no key."""
    try:
        raw_lines = Path(witness_path).read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    best = 0
    for raw in raw_lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        lines = check_witness(entry, job_id, public_key)
        if lines is not None and best < lines <= len(records) and records[lines - 1].get("hash") == entry["statement"]["head"]:
            best = lines
    return best


def check_witness(entry: Any, job_id: str, public_key: ed25519.Ed25519PublicKey) -> int | None:
    """The line count a witness entry vouches for, when it is one for `job_id` signed with
    `public_key`; else None."""
    try:
        statement = entry["statement"]
        if statement != witness_statement(job_id, statement["head"], statement["lines"]) or not isinstance(statement["lines"], int):
            return None
        public_key.verify(base64.b64decode(entry["signature"]), canonical_json(statement).encode("utf-8"))
    except (InvalidSignature, ValueError, TypeError, KeyError):
        return None
    return statement["lines"]
