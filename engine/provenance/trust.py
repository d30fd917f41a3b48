"""Signed records: the lab's keys, the signed head of every published job, the outbox's journal.

The hash chain of audit.jsonl and manifest.json catch an edited byte, but anyone who can write
the share can rewrite a job consistently (re-hash the chain from the changed line on). What they
cannot recompute is a signature by a key they do not hold:

- **Lab keys** (`python -m engine keys init --out DIR`, offline, `cryptography`), in one folder:
      audit-signing.key.pem     Ed25519 private key: signs job heads and journal lines (0600)
      audit-signing.pub.pem     its public key, what a reviewer verifies with
      lab-ca.key.pem            the lab CA's private key (0600): issues signer certificates; keep it offline
      lab-ca.cert.pem           the lab CA: the trust anchor of the images' Content Credentials
      content-signer.key.pem    ES256 key that signs the images' C2PA manifests (0600)
      content-signer.chain.pem  its certificate (CA:false, digitalSignature, emailProtection, SKI/AKI) + the CA's
  Config `[trust] keys` names the folder; the daemon needs the audit key and the content signer,
  a reviewer only the two public files. Private keys never go into an outbox.
- **Signed head** (`signature.json` in every published or failed job folder, not in its manifest,
  which it signs): a statement of the job id, subject, where it is (outbox or failed/, and its
  path there), the audit log's head hash and line count, and the manifest's (or error.json's)
  sha256, signed with Ed25519 over its canonical JSON.
- **Journal** (`<outbox>/.journal/journal.jsonl`): one line per published or failed job with its
  signed statement; hash-chained, each line signed too, appended under an exclusive lock (several
  daemons share an outbox) and behind the job's fence. It is what tells a deleted job, two
  subjects' folders swapped, or a folder put back from an older copy: engine.provenance.verification.verify_journal.
  Cutting the journal back to an earlier line together with the jobs after it is the one edit a
  signature cannot show: keep a note of the head `verify-journal` prints.
Without keys the same records are written unsigned, and every check says `unsigned` plainly.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.provenance.chain import GENESIS, good_prefix, parse_line
from engine.errors import ConfigError
from engine.fsutil import append_whole, canonical_json, check_write, fsync_dir, sha256_bytes, sha256_file
from engine.layout import AUDIT_FILE, ERROR_FILE, MANIFEST_FILE

AUDIT_KEY = "audit-signing.key.pem"
AUDIT_PUBLIC_KEY = "audit-signing.pub.pem"
CA_KEY = "lab-ca.key.pem"
CA_CERT = "lab-ca.cert.pem"
SIGNER_KEY = "content-signer.key.pem"
SIGNER_CHAIN = "content-signer.chain.pem"
JOURNAL_DIR = ".journal"
JOURNAL_FILE = "journal.jsonl"
STATEMENT_VERSION = 2  # see build_statement


# ---------------------------------------------------------------------------- keys

def make_lab_keys(out: Path, lab: str = "Forensic lab", *, ca_days: int = 3650, signer_days: int = 1825) -> dict[str, Path]:
    """Make a new set of lab keys in the folder `out` (created; refused when it holds keys already).
    Returns {file name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in (AUDIT_KEY, CA_KEY, SIGNER_KEY) if (out / name).exists()]
    if existing:
        raise ConfigError("keys_exist", f"{out} already holds lab keys ({', '.join(existing)}): a new set would orphan every "
                                        "signature made with them; choose another folder")
    now = dt.datetime.now(dt.timezone.utc)
    audit = ed25519.Ed25519PrivateKey.generate()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{lab} CA"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, lab)])
    no_usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False)
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=ca_days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **no_usage), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{lab} content signer"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, lab)])
    # c2pa refuses a signer certificate without these: CA:false, digitalSignature, an EKU it
    # accepts (emailProtection; documentSigning needs an extra trust setting), SKI and AKI (FINDINGS).
    signer_cert = (x509.CertificateBuilder().subject_name(signer_name).issuer_name(ca_name).public_key(signer_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=signer_days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **no_usage), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    private = dict(encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    files = {
        AUDIT_KEY: (audit.private_bytes(**private), 0o600),
        AUDIT_PUBLIC_KEY: (audit.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644),
        CA_KEY: (ca_key.private_bytes(**private), 0o600),
        CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        SIGNER_KEY: (signer_key.private_bytes(**private), 0o600),
        SIGNER_CHAIN: (signer_cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
    }
    for name, (data, mode) in files.items():
        _write_new(out / name, data, mode)
    fsync_dir(out)
    return {name: out / name for name in files}


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the first byte on (a private key is never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: how records and people name a key."""
    return sha256_bytes(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError("invalid_key", f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class LabKeys:
    """The keys a job is signed with, loaded from the [trust] keys folder."""

    folder: Path
    audit_key: ed25519.Ed25519PrivateKey
    signer_key_pem: bytes
    signer_chain_pem: bytes
    ca_cert_pem: bytes

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.audit_key.public_key()

    @property
    def key_fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def signer_subject(self) -> str:
        return x509.load_pem_x509_certificate(self.signer_chain_pem).subject.rfc4514_string()

    @property
    def ca_subject(self) -> str:
        return x509.load_pem_x509_certificate(self.ca_cert_pem).subject.rfc4514_string()

    def facts(self) -> dict[str, Any]:
        """Who signs, for the audit log and the report (no secret in it)."""
        return {"signed": True, "key_fingerprint": self.key_fingerprint, "content_signer": self.signer_subject, "lab_ca": self.ca_subject}

    @classmethod
    def load(cls, folder: Path) -> "LabKeys":
        folder = Path(folder)
        missing = [name for name in (AUDIT_KEY, SIGNER_KEY, SIGNER_CHAIN, CA_CERT) if not (folder / name).is_file()]
        if missing:
            raise ConfigError("keys_missing", f"[trust] keys = {folder}: {', '.join(missing)} missing; make a set with "
                                              "`python -m engine keys init --out DIR` and point [trust] keys at it")
        audit = serialization.load_pem_private_key((folder / AUDIT_KEY).read_bytes(), password=None)
        if not isinstance(audit, ed25519.Ed25519PrivateKey):
            raise ConfigError("invalid_key", f"{folder / AUDIT_KEY} is not an Ed25519 private key")
        return cls(folder=folder, audit_key=audit, signer_key_pem=(folder / SIGNER_KEY).read_bytes(),
                   signer_chain_pem=(folder / SIGNER_CHAIN).read_bytes(), ca_cert_pem=(folder / CA_CERT).read_bytes())

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.audit_key.sign(data)).decode("ascii")


UNSIGNED_FACTS = {"signed": False, "note": "no [trust] keys configured: records are hash-chained but unsigned"}


# ---------------------------------------------------------------------------- signed heads

def _hash_and_count_lines(path: Path) -> tuple[str, int]:
    """(sha256, number of newline-terminated lines) of a file, from its bytes alone (no parsing)."""
    import hashlib

    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    return digest.hexdigest(), lines


def build_statement(folder: Path, *, where: str, path: str, job_id: str, subject: str) -> dict[str, Any]:
    """What a signature vouches for, built from the job folder's bytes alone (hashes and a line
    count: nothing in it is parsed, so the signer can build it itself): `where` is "outbox" or
    "failed", `path` the folder's place there ("<subject>/<job-id>"). The verifier builds the
    same statement from the folder it checks and compares them key by key.

    Version 2 (this one): the audit log's whole-file sha256 and line count; manifest.json's sha256
    for a finished job, error.json's and manifest.json's for a failed one (its manifest lists its
    inputs/). Version 1 (older jobs, still verified): the audit head line's hash instead."""
    folder = Path(folder)
    audit = folder / AUDIT_FILE
    audit_sha256, audit_lines = _hash_and_count_lines(audit) if audit.is_file() else (sha256_bytes(b""), 0)
    statement: dict[str, Any] = {"version": STATEMENT_VERSION, "kind": "finished" if where == "outbox" else "failed", "where": where,
                                 "path": path, "job_id": job_id, "subject": subject, "audit_sha256": audit_sha256, "audit_lines": audit_lines}
    manifest = folder / MANIFEST_FILE
    if where == "outbox":
        statement["manifest_sha256"] = sha256_file(manifest)
    else:
        statement["error_sha256"] = sha256_file(folder / ERROR_FILE)
        statement["manifest_sha256"] = sha256_file(manifest) if manifest.is_file() else None
    return statement


def signed_document(statement: dict[str, Any], keys: LabKeys | None) -> dict[str, Any]:
    """signature.json's content: the statement and its Ed25519 signature (or the plain note that it is unsigned)."""
    document: dict[str, Any] = {"statement": statement, "algorithm": "Ed25519" if keys else None}
    if keys is None:
        document.update(signature=None, key_fingerprint=None, public_key=None, note=UNSIGNED_FACTS["note"])
    else:
        raw = keys.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        document.update(signature=keys.sign(canonical_json(statement).encode("utf-8")), key_fingerprint=keys.key_fingerprint,
                        public_key=base64.b64encode(raw).decode("ascii"))
    return document


def witness_statement(job_id: str, head: str, lines: int) -> dict[str, Any]:
    """What the signer signs while a job runs (engine.provenance.audit.AuditLog's witness): its audit chain had
    this head hash after this many lines. A resume trusts the chain up to the longest prefix so
    witnessed; nothing else (not the reviewer's check) depends on it."""
    return {"kind": "witness", "job_id": job_id, "head": head, "lines": lines}


def public_key_from_b64(raw: str | None) -> ed25519.Ed25519PublicKey | None:
    """The Ed25519 public key of the signer's facts (base64 of its 32 raw bytes), or None."""
    return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(raw)) if raw else None


def statement_sha256(statement: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json(statement).encode("utf-8"))


# ---------------------------------------------------------------------------- the journal

TORN_SUFFIX = ".torn-"  # journal.jsonl.torn-<UTC time>-<sha256 prefix>: a torn tail cut off the journal, kept


def journal_path(outbox: Path) -> Path:
    return Path(outbox) / JOURNAL_DIR / JOURNAL_FILE


def journal_line_hash(record: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k not in ("hash", "signature")}).encode("utf-8"))


class Journal:
    """The outbox's journal inside `journal_transaction`: its lines (read under the lock, a torn
    tail repaired first) and `append`, which chains, signs and writes one line whole or not at all."""

    def __init__(self, path: Path, keys: LabKeys | None, lines: list[dict[str, Any]]) -> None:
        self.path = path
        self.keys = keys
        self.lines = lines

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = {"seq": len(self.lines) + 1, "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields,
                  "key_fingerprint": self.keys.key_fingerprint if self.keys else fields.get("key_fingerprint"),
                  "prev": self.lines[-1]["hash"] if self.lines else GENESIS}
        record["signature"] = self.keys.sign(journal_line_hash(record).encode("ascii")) if self.keys else None
        record["hash"] = journal_line_hash(record)
        append_whole(self.path, (canonical_json(record) + "\n").encode("utf-8"))
        self.lines.append(record)
        return record

    def find_job(self, job_id: str) -> list[dict[str, Any]]:
        """The lines of a job id (its sealed heads)."""
        return [line for line in self.lines if line.get("job_id") == job_id and line.get("kind") != "repair"]


@contextlib.contextmanager
def journal_transaction(outbox: Path, keys: LabKeys | None) -> Iterator[Journal]:
    """The outbox's journal under its exclusive lock (several daemons share an outbox). A torn
    tail is repaired first: the bytes are kept aside as `journal.jsonl.torn-<time>-<sha>`, the
    journal is cut back to its last whole line, and the repair itself is the next line (signed,
    chained: `kind: "repair"`, with the removed bytes' count and sha256)."""
    path = journal_path(outbox)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        good = good_prefix(data)
        repair = _cut_torn_tail(path, data, good) if good < len(data) else None
        lines = [parse_line(raw) or {"unreadable": raw[:80].decode("utf-8", "replace")} for raw in data[:good].split(b"\n")[:-1]]
        journal = Journal(path, keys, lines)
        if repair is not None:
            journal.append({"kind": "repair", "where": None, "path": None, "job_id": None, "repair": repair})
        yield journal
    finally:
        os.close(lock)


def _cut_torn_tail(path: Path, data: bytes, good: int) -> dict[str, Any]:
    fragment = data[good:]
    digest = sha256_bytes(fragment)
    kept = path.with_name(f"{path.name}{TORN_SUFFIX}{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}-{digest[:12]}")
    check_write(str(kept))
    _write_new(kept, fragment, 0o644)
    check_write(str(path))
    with open(path, "r+b") as handle:
        handle.truncate(good)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(path.parent)
    return {"removed_bytes": len(fragment), "removed_sha256": digest, "kept_as": kept.name, "at_byte": good}


def journal_fields(document: dict[str, Any]) -> dict[str, Any]:
    """The journal line of a signed head `document` (signature.json's content)."""
    statement = document["statement"]
    return {"where": statement["where"], "path": statement["path"], "job_id": statement["job_id"], "kind": statement["kind"],
            "statement": statement, "statement_sha256": statement_sha256(statement), "statement_signature": document.get("signature"),
            "key_fingerprint": document.get("key_fingerprint")}


def append_journal(outbox: Path, document: dict[str, Any], keys: LabKeys | None) -> dict[str, Any]:
    """Append the signed head `document` to the outbox's journal, once (a head already there is
    returned as it is). The signer (engine.provenance.signer) does this as part of sealing a job."""
    with journal_transaction(outbox, keys) as journal:
        digest = statement_sha256(document["statement"])
        for line in journal.lines:
            if line.get("statement_sha256") == digest:
                return line
        return journal.append(journal_fields(document))


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every whole line of a journal (an unreadable one as {"unreadable": its start}; a torn tail,
    bytes after the last newline, is left out: `torn_tail` says how many); [] when there is none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [parse_line(raw) or {"unreadable": raw[:80].decode("utf-8", "replace")} for raw in data.split(b"\n")[:-1]]


def torn_tail(path: Path) -> int:
    """Bytes at the end of a journal that are not whole lines (0 when none, or no journal)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    return len(data) - good_prefix(data)


# ---------------------------------------------------------------------------- checking one job

