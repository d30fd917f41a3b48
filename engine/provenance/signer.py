"""The signer: the one process that holds the lab's private keys (OpenSSH's privilege separation,
ssh-agent's socket).

Why a process of its own: the engine decodes photos from the share, loads models and reads
resume state. A bug in any of those parsers would hand the process to whoever wrote the bytes,
and with it every key that process holds. So the engine holds none. When `[trust] keys` names a
folder, the engine starts this module as a child process (`start_signer`), which reads the keys,
listens on a Unix socket in a private folder (the folder 0700, the socket 0600, peers of the same
uid only), and answers one JSON line per request:

    facts    the public side: key fingerprint, who signs images, the content signer's certificate chain
    seal     a job folder's signed head. The signer hashes the folder's audit.jsonl, manifest.json
             (and error.json) itself, builds the statement (engine.provenance.trust.build_statement), signs it,
             writes signature.json into the folder and appends the outbox's journal line. Once per
             job id: a second, different head for a job id the journal already holds is refused
             (`already_sealed`); the same head again is answered as before (a re-run after a kill).
    content  an ES256 signature over the to-be-signed bytes of a C2PA claim (c2pa builds them in
             the engine and calls back), for a job that has a work folder and is not sealed yet.
    witness  a signature over a running job's audit chain head and length (engine.provenance.trust.
             witness_statement), for the same jobs: what lets a resume tell the chain it wrote from
             one a share-writer re-hashed (engine.provenance.verification.witnessed_prefix).

It never decodes an image, unpickles, loads a model or reads a ledger: it hashes bytes, and
parses JSON (the standard library's, size-bounded) only of requests and of its own journal. It
exits when its parent does (its stdin closes).

Without keys there is nothing to protect: the engine seals in its own process with the same code
(`Sealer(None)`), unsigned.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Protocol

from engine.errors import ConfigError
from engine.fsutil import canonical_json
from engine.layout import failure_staging, work_dir
from engine.provenance.trust import (UNSIGNED_FACTS, LabKeys, build_statement, journal_fields, journal_path, journal_transaction, read_journal,
                          signed_document, statement_sha256, witness_statement)

SOCKET_NAME = "signer.sock"
MAX_REQUEST = 4 << 20  # bytes of one request line (a C2PA claim is a few KB)
MAX_CONTENT = 1 << 20  # bytes of one C2PA to-be-signed blob
START_SECONDS = 60.0


class SealRefused(Exception):
    """The signer will not sign this: `code` says why (already_sealed, bad_request, sealed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Seals(Protocol):
    """What the engine asks of a signer (in its own process without keys, else over the socket)."""

    def facts(self) -> dict[str, Any]: ...

    def seal(self, folder: Path, *, outbox: Path, where: str, path: str, job_id: str, subject: str) -> dict[str, Any]: ...

    def content_signature(self, job_id: str, outbox: Path, data: bytes) -> bytes: ...

    def witness(self, job_id: str, outbox: Path, head: str, lines: int) -> dict[str, Any] | None: ...


# ---------------------------------------------------------------------------- the logic

class Sealer:
    """Signs job heads and C2PA claims with `keys` (None: unsigned heads, no C2PA). The rules live
    here; the server below only carries requests to it."""

    def __init__(self, keys: LabKeys | None) -> None:
        self.keys = keys
        self._content_key = None
        if keys is not None:
            from cryptography.hazmat.primitives import serialization

            self._content_key = serialization.load_pem_private_key(keys.signer_key_pem, password=None)
        self._sealed_cache: dict[str, tuple[tuple[int, int], frozenset[str]]] = {}
        self._lock = threading.Lock()

    def facts(self) -> dict[str, Any]:
        if self.keys is None:
            return {"trust": dict(UNSIGNED_FACTS), "signer_chain_pem": None, "public_key": None}
        from cryptography.hazmat.primitives import serialization

        raw = self.keys.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"trust": self.keys.facts(), "signer_chain_pem": self.keys.signer_chain_pem.decode("ascii"),
                "public_key": base64.b64encode(raw).decode("ascii")}

    def seal(self, folder: Path, *, outbox: Path, where: str, path: str, job_id: str, subject: str) -> dict[str, Any]:
        """signature.json for the job folder `folder`, and its journal line: see the module's doc."""
        folder, outbox = Path(folder), Path(outbox)
        _check_place(folder, outbox, where, path, job_id, subject)
        statement = build_statement(folder, where=where, path=path, job_id=job_id, subject=subject)
        digest = statement_sha256(statement)
        with self._lock, journal_transaction(outbox, self.keys) as journal:
            earlier = journal.find_job(job_id)
            if earlier and all(line.get("statement_sha256") != digest for line in earlier):
                line = earlier[-1]
                raise SealRefused("already_sealed", f"job {job_id} was sealed before (journal line {line.get('seq')}: "
                                                    f"{line.get('where')}:{line.get('path')}) with another head; a job id is sealed once. "
                                                    f"{folder} differs from what was sealed then")
            document = signed_document(statement, self.keys)
            _write_document(folder, document)  # before the journal line: a kill between the two is answered again, the same
            if not earlier:
                journal.append(journal_fields(document))
        return document

    def witness(self, job_id: str, outbox: Path, head: str, lines: int) -> dict[str, Any] | None:
        """A running job's audit chain had `head` after `lines` lines: signed (None without keys)."""
        if self.keys is None:
            return None
        self._check_in_progress(job_id, Path(outbox))
        if not isinstance(head, str) or len(head) != 64 or not isinstance(lines, int) or lines < 1:
            raise SealRefused("bad_request", "a witness names a sha256 head and a line count")
        statement = witness_statement(job_id, head, lines)
        return {"statement": statement, "signature": self.keys.sign(canonical_json(statement).encode("utf-8"))}

    def content_signature(self, job_id: str, outbox: Path, data: bytes) -> bytes:
        """ES256 (DER) over `data`, the to-be-signed bytes of a C2PA claim of job `job_id`."""
        if self._content_key is None:
            raise SealRefused("unsigned", "no lab keys: images are not signed")
        if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CONTENT:
            raise SealRefused("bad_request", f"a C2PA claim to sign is 1 to {MAX_CONTENT} bytes")
        self._check_in_progress(job_id, Path(outbox))
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self._content_key.sign(data, ec.ECDSA(hashes.SHA256()))

    def _check_in_progress(self, job_id: str, outbox: Path) -> None:
        """Images and witnesses are signed only for a job that has a work folder and no head yet."""
        _check_name(job_id, "job_id")
        if not work_dir(outbox, job_id).is_dir():
            raise SealRefused("bad_request", f"job {job_id} has no work folder in {work_dir(outbox, job_id).parent}: not a job in progress")
        if job_id in self._sealed(outbox):
            raise SealRefused("sealed", f"job {job_id} is sealed: nothing more is signed for it")

    def _sealed(self, outbox: Path) -> frozenset[str]:
        """The job ids the outbox's journal holds (read again when the journal changes)."""
        path = journal_path(outbox)
        try:
            info = path.stat()
        except FileNotFoundError:
            return frozenset()
        key = (info.st_size, info.st_mtime_ns)
        cached = self._sealed_cache.get(str(outbox))
        if cached is None or cached[0] != key:
            ids = frozenset(str(line.get("job_id")) for line in read_journal(path) if line.get("job_id"))
            cached = (key, ids)
            self._sealed_cache[str(outbox)] = cached
        return cached[1]


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or value.startswith(".") or "/" in value or "\x00" in value or len(value) > 255:
        raise SealRefused("bad_request", f"{what} {value!r} is not a plain folder name")


def _check_place(folder: Path, outbox: Path, where: str, path: str, job_id: str, subject: str) -> None:
    """A head is signed only for a job folder where a job folder of that id and subject is
    (being) published: the outbox's work folder or published folder, failed/'s staging or published folder."""
    _check_name(job_id, "job_id")
    _check_name(subject, "subject")
    if path != f"{subject}/{job_id}":
        raise SealRefused("bad_request", f"path {path!r} is not <subject>/<job id>")
    if folder.is_symlink() or not folder.is_dir():
        raise SealRefused("bad_request", f"{folder} is not a folder")
    folder = folder.resolve()
    if where == "outbox":
        places = {work_dir(outbox, job_id).resolve(), (outbox / subject / job_id).resolve()}
        if folder not in places:
            raise SealRefused("bad_request", f"{folder} is neither job {job_id}'s work folder nor its place in {outbox}")
    elif where == "failed":
        if folder.parent.name != subject or folder.name not in (job_id, failure_staging(folder.parent.parent, subject, job_id).name):
            raise SealRefused("bad_request", f"{folder} is not failed/{subject}/{job_id} (or its staging folder)")
    else:
        raise SealRefused("bad_request", f"where {where!r} is neither outbox nor failed")


def _write_document(folder: Path, document: dict[str, Any]) -> None:
    from engine.fsutil import atomic_write_json
    from engine.layout import SIGNATURE_FILE

    atomic_write_json(folder / SIGNATURE_FILE, document)


# ---------------------------------------------------------------------------- the process

def serve(keys_dir: Path, socket_path: Path) -> int:
    """The signer process: load the keys, listen, answer, until the parent goes (stdin EOF)."""
    try:
        sealer = Sealer(LabKeys.load(keys_dir))
    except ConfigError as error:
        _say({"ready": False, "code": error.code, "message": error.message})
        return 2
    except (OSError, ValueError, TypeError) as error:
        _say({"ready": False, "code": "invalid_key", "message": f"[trust] keys = {keys_dir}: {error}"})
        return 2
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    os.chmod(socket_path, 0o600)  # in a 0700 folder already; and only this uid may connect (peer check below)
    server.listen(8)
    threading.Thread(target=_exit_with_parent, daemon=True, name="signer-parent").start()
    _say({"ready": True, "pid": os.getpid(), "facts": sealer.facts()})
    while True:
        connection, _ = server.accept()
        threading.Thread(target=_answer, args=(sealer, connection), daemon=True, name="signer-connection").start()


def _exit_with_parent() -> None:
    while sys.stdin.buffer.read(1):
        pass
    os._exit(0)


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _answer(sealer: Sealer, connection: socket.socket) -> None:
    with connection:
        uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            return
        reader = connection.makefile("rb")
        while True:
            line = reader.readline(MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
                connection.sendall(_reply_error("bad_request", "request too long"))
                return
            connection.sendall(_handle(sealer, line))


def _handle(sealer: Sealer, line: bytes) -> bytes:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not an object")
        op = request.get("op")
        if op == "facts":
            result: Any = sealer.facts()
        elif op == "seal":
            result = sealer.seal(Path(str(request["folder"])), outbox=Path(str(request["outbox"])), where=str(request["where"]),
                                 path=str(request["path"]), job_id=request["job_id"], subject=request["subject"])
        elif op == "witness":
            result = sealer.witness(request["job_id"], Path(str(request["outbox"])), request["head"], request["lines"])
        elif op == "content":
            signature = sealer.content_signature(request["job_id"], Path(str(request["outbox"])), base64.b64decode(request["data"]))
            result = base64.b64encode(signature).decode("ascii")
        else:
            raise SealRefused("bad_request", f"unknown op {op!r}")
    except SealRefused as refused:
        return _reply_error(refused.code, refused.message)
    except OSError as error:
        return (json.dumps({"ok": False, "os_error": {"errno": error.errno, "strerror": error.strerror or str(error),
                                                      "filename": None if error.filename is None else str(error.filename)}}) + "\n").encode()
    except (ValueError, KeyError, TypeError) as error:
        return _reply_error("bad_request", f"{type(error).__name__}: {error}")
    return (json.dumps({"ok": True, "result": result}) + "\n").encode()


def _reply_error(code: str, message: str) -> bytes:
    return (json.dumps({"ok": False, "code": code, "message": message}) + "\n").encode()


# ---------------------------------------------------------------------------- the engine's side

class SignerClient:
    """Talks to a signer over its socket (one connection, one request at a time)."""

    def __init__(self, socket_path: Path, facts: dict[str, Any] | None = None) -> None:
        self.socket_path = Path(socket_path)
        self._connection: socket.socket | None = None
        self._reader: Any = None
        self._lock = threading.Lock()
        self._facts = facts

    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = self._request({"op": "facts"})
        return self._facts

    def seal(self, folder: Path, *, outbox: Path, where: str, path: str, job_id: str, subject: str) -> dict[str, Any]:
        return self._request({"op": "seal", "folder": str(folder), "outbox": str(outbox), "where": where, "path": path,
                              "job_id": job_id, "subject": subject})

    def witness(self, job_id: str, outbox: Path, head: str, lines: int) -> dict[str, Any] | None:
        return self._request({"op": "witness", "job_id": job_id, "outbox": str(outbox), "head": head, "lines": lines})

    def content_signature(self, job_id: str, outbox: Path, data: bytes) -> bytes:
        return base64.b64decode(self._request({"op": "content", "job_id": job_id, "outbox": str(outbox),
                                               "data": base64.b64encode(data).decode("ascii")}))

    def _request(self, request: dict[str, Any]) -> Any:
        line = (json.dumps(request) + "\n").encode()
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._connection is None:
                        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        self._connection.connect(str(self.socket_path))
                        self._reader = self._connection.makefile("rb")
                    self._connection.sendall(line)
                    answer = self._reader.readline(MAX_REQUEST)
                    if not answer:
                        raise ConnectionError("the signer closed the connection")
                    break
                except OSError as error:
                    self._close()
                    if attempt == 2:
                        raise ConfigError("signer_unreachable", f"the signer at {self.socket_path} does not answer ({error}): it holds "
                                                                "the lab keys; restart the daemon") from None
        reply = json.loads(answer)
        if reply.get("ok"):
            return reply["result"]
        if "os_error" in reply:
            fault = reply["os_error"]
            raise OSError(fault.get("errno"), fault.get("strerror"), fault.get("filename"))
        raise SealRefused(reply.get("code", "refused"), reply.get("message", "refused"))

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except OSError:
                pass
        self._connection, self._reader = None, None


class SignerProcess(SignerClient):
    """A signer this process started (`start_signer`): a client of it that stops it when dropped."""

    def __init__(self, process: subprocess.Popen, socket_path: Path, facts: dict[str, Any]) -> None:
        super().__init__(socket_path, facts)
        self.process = process
        self.pid = process.pid
        self._finalizer = weakref.finalize(self, _stop, process, Path(socket_path).parent)

    def close(self) -> None:
        self._close()
        self._finalizer()


def _stop(process: subprocess.Popen, folder: Path) -> None:
    try:
        if process.stdin is not None:
            process.stdin.close()  # the signer exits when its stdin closes
        process.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
    for leftover in (folder / SOCKET_NAME, folder):
        try:
            leftover.unlink() if leftover.name == SOCKET_NAME else leftover.rmdir()
        except OSError:
            pass


def start_signer(keys_dir: Path) -> SignerProcess:
    """Start a signer for the keys in `keys_dir` (a child process; this process never reads the
    keys). ConfigError naming what is wrong when it cannot start (keys missing or unreadable)."""
    folder = Path(tempfile.mkdtemp(prefix="idrep-signer-"))  # 0700
    socket_path = folder / SOCKET_NAME
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = subprocess.Popen([sys.executable, "-m", "engine.provenance.signer", "--keys", str(keys_dir), "--socket", str(socket_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, cwd="/")
    assert process.stdout is not None
    ready = _read_ready(process)
    if not ready.get("ready"):
        process.wait(timeout=10)
        try:
            folder.rmdir()
        except OSError:
            pass
        raise ConfigError(ready.get("code", "signer_failed"), ready.get("message", "the signer did not start"))
    process.stdout.close()
    return SignerProcess(process, socket_path, ready["facts"])


def _read_ready(process: subprocess.Popen) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def read() -> None:
        line = process.stdout.readline()  # type: ignore[union-attr]
        try:
            result.update(json.loads(line))
        except ValueError:
            result.update(ready=False, code="signer_failed", message=f"the signer said {line[:200]!r} (exit {process.poll()})")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_SECONDS)
    if reader.is_alive():
        process.kill()
        return {"ready": False, "code": "signer_failed", "message": f"the signer did not start within {START_SECONDS:.0f} s"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.provenance.signer", description="the lab keys' signer (started by the engine)")
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args(argv)
    return serve(args.keys, args.socket)


if __name__ == "__main__":
    sys.exit(main())
