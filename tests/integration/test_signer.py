"""The signer process (engine.provenance.signer): it holds the lab keys, nothing else does. It seals a job id
once, signs images only for a job in progress, answers only its own uid, loads no parser of
photos or models, and goes when its parent goes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.provenance.audit import AuditLog, write_manifest
from engine.fsutil import tree_listing
from engine.provenance.signer import SealRefused, start_signer
from engine.provenance.trust import (UNSIGNED_FACTS, LabKeys, journal_path, load_public_key, read_journal, AUDIT_PUBLIC_KEY)
from engine.provenance.verification import verify_audit, verify_journal


@pytest.fixture(scope="module")
def signer(lab_keys):
    process = start_signer(lab_keys)
    yield process
    process.close()


def _finished_work_folder(outbox: Path, job_id: str) -> Path:
    """A finished job as the engine leaves it in its work folder before sealing."""
    folder = outbox / ".work" / job_id
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "photo.png").write_bytes(b"a photo")
    (folder / "renders").mkdir()
    (folder / "renders" / "r.png").write_bytes(b"a render")
    audit = AuditLog(folder / "audit.jsonl", job_id)
    audit.event("job_started", inputs={"photo.png": "x"})
    digest = write_manifest(folder, job_id, tree_listing(folder / "inputs").entries, {}, demo=True, trust=UNSIGNED_FACTS, kind="replicate")
    audit.event("job_finished", manifest_sha256=digest)
    return folder


def test_the_signer_seals_a_job_id_once_and_answers_the_same_head_again(signer, lab_keys, tmp_path):
    outbox = tmp_path / "outbox"
    folder = _finished_work_folder(outbox, "job-1")
    document = signer.seal(folder, outbox=outbox, where="outbox", path="alice/job-1", job_id="job-1", subject="alice")
    assert document["signature"] and document["key_fingerprint"] == LabKeys.load(lab_keys).key_fingerprint
    assert json.loads((folder / "signature.json").read_text()) == document  # the signer wrote it, from the files it hashed
    # A re-run after a kill asks again for the same folder: the same head, and still one journal line.
    assert signer.seal(folder, outbox=outbox, where="outbox", path="alice/job-1", job_id="job-1", subject="alice") == document
    assert [line["job_id"] for line in read_journal(journal_path(outbox))] == ["job-1"]
    # One more audit line (a worker that tries to get a second, different head for the same job): refused.
    AuditLog(folder / "audit.jsonl", "job-1").event("forged_afterwards")
    with pytest.raises(SealRefused, match="sealed before") as refused:
        signer.seal(folder, outbox=outbox, where="outbox", path="alice/job-1", job_id="job-1", subject="alice")
    assert refused.value.code == "already_sealed"
    # ... and as a failed job under the same id (a published job is never also put in failed/).
    staging = tmp_path / "failed" / "alice" / ".job-1.incoming"
    shutil.copytree(folder, staging)
    (staging / "error.json").write_text("{}")
    with pytest.raises(SealRefused, match="sealed before"):
        signer.seal(staging, outbox=outbox, where="failed", path="alice/job-1", job_id="job-1", subject="alice")
    assert len(read_journal(journal_path(outbox))) == 1
    # Nor for a folder that is not where such a job goes.
    elsewhere = tmp_path / "elsewhere" / "job-2"
    shutil.copytree(folder, elsewhere)
    with pytest.raises(SealRefused, match="neither job job-2's work folder"):
        signer.seal(elsewhere, outbox=outbox, where="outbox", path="alice/job-2", job_id="job-2", subject="alice")


def test_images_and_witnesses_are_signed_only_for_a_job_in_progress(signer, lab_keys, tmp_path):
    from engine.provenance.verification import check_witness

    outbox = tmp_path / "outbox"
    folder = _finished_work_folder(outbox, "job-3")
    assert len(signer.content_signature("job-3", outbox, b"to be signed")) > 60  # a DER ECDSA signature
    witness = signer.witness("job-3", outbox, "a" * 64, 2)
    assert check_witness(witness, "job-3", load_public_key(lab_keys / AUDIT_PUBLIC_KEY)) == 2
    assert check_witness(witness, "job-4", load_public_key(lab_keys / AUDIT_PUBLIC_KEY)) is None
    with pytest.raises(SealRefused, match="no work folder"):
        signer.content_signature("job-4", outbox, b"to be signed")
    with pytest.raises(SealRefused, match="no work folder"):
        signer.witness("job-4", outbox, "a" * 64, 2)
    signer.seal(folder, outbox=outbox, where="outbox", path="bob/job-3", job_id="job-3", subject="bob")
    with pytest.raises(SealRefused, match="is sealed"):
        signer.content_signature("job-3", outbox, b"to be signed")
    with pytest.raises(SealRefused, match="is sealed"):
        signer.witness("job-3", outbox, "a" * 64, 3)


def test_the_signer_is_private_to_its_uid_and_loads_no_parser_of_photos_or_models(signer):
    folder = signer.socket_path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(signer.socket_path.stat().st_mode) == 0o600
    maps = Path(f"/proc/{signer.pid}/maps").read_text()
    for library in ("libtorch", "_multiarray_umath", "_imaging", "c2pa", "onnxruntime", "cv2", "safetensors"):
        assert library not in maps, f"the signer process loaded {library}"
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.getuid() != 0:
        pytest.skip("needs root and setpriv to try the socket as another uid")
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); s.sendall(b'{\"op\":\"facts\"}\\n'); print('answer', s.recv(100))\n"
             "except OSError as e:\n print('refused', e.errno)\n")
    # As "nobody", even with the folder's modes opened up: the peer check refuses another uid.
    os.chmod(folder, 0o755)
    os.chmod(signer.socket_path, 0o666)
    try:
        result = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe, str(signer.socket_path)],
                                capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(folder, 0o700)
        os.chmod(signer.socket_path, 0o600)
    if "Operation not permitted" in result.stderr:
        pytest.skip(f"setpriv refused here: {result.stderr.strip()}")
    assert "answer b''" in result.stdout or "refused" in result.stdout, (result.stdout, result.stderr)
    assert signer.facts()["trust"]["signed"]  # and it still answers its own uid


def test_the_signer_goes_with_its_parent_and_missing_keys_are_named(lab_keys, tmp_path):
    process = start_signer(lab_keys)
    pid = process.pid
    process.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="audit-signing.key.pem"):
        start_signer(tmp_path / "no-keys")


def test_a_sealed_job_verifies_with_the_reviewers_key(signer, lab_keys, tmp_path):
    outbox = tmp_path / "outbox"
    folder = _finished_work_folder(outbox, "job-5")
    signer.seal(folder, outbox=outbox, where="outbox", path="carol/job-5", job_id="job-5", subject="carol")
    (outbox / "carol").mkdir()
    folder.rename(outbox / "carol" / "job-5")
    key = load_public_key(lab_keys / AUDIT_PUBLIC_KEY)
    report = verify_audit(outbox / "carol" / "job-5", trusted_key=key)
    assert report.ok and report.trust.signed == "trusted", report.problems
    journal = verify_journal(outbox, trusted=key)
    assert journal.ok and journal.signed == "trusted", journal.problems


def _secrets(keys: Path) -> dict[str, bytes]:
    """The private key material a memory dump would show: the raw keys and their PEM files' text."""
    from cryptography.hazmat.primitives import serialization

    from engine.provenance.trust import AUDIT_KEY, SIGNER_KEY

    audit = serialization.load_pem_private_key((keys / AUDIT_KEY).read_bytes(), None)
    content = serialization.load_pem_private_key((keys / SIGNER_KEY).read_bytes(), None)
    secrets = {"audit key (raw)": audit.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
               "content key (scalar)": content.private_numbers().private_value.to_bytes(32, "big")}
    for name in (AUDIT_KEY, SIGNER_KEY):
        secrets[f"{name} (PEM)"] = (keys / name).read_bytes().splitlines()[1]  # a base64 line of the key
    return secrets


def _found_in_memory(pid: int, secrets: dict[str, bytes]) -> set[str]:
    """Which secrets appear in the writable, non-file memory of process `pid` (heap, stacks,
    anonymous maps: where a process keeps what it read or derived)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or "w" not in fields[1] or (path and not path.startswith("[")) or path in ("[vvar]", "[vsyscall]"):
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            found |= {name for name, secret in secrets.items() if secret in chunk}
    return found


def test_a_process_running_a_signed_job_holds_no_private_key(lab_keys, tmp_path, astronaut_rgb):
    """The engine process (the one that decodes photos, loads models and reads resume state) has
    no private key in its memory or its open files while it runs a signed job, after it signed
    images and before it seals; the signer beside it has (the control that shows the scan works)."""
    import signal

    from tests.harness.jobs import FAST_JOB, make_job
    from tests.harness.paths import REPO

    if os.getuid() != 0 and Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0":
        pytest.skip("reading another process's memory needs root here (yama ptrace_scope)")
    source = make_job(tmp_path / "inbox" / "alice", {"photo.png": astronaut_rgb}, FAST_JOB)
    (tmp_path / "models").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{tmp_path / "models"}"\n[trust]\nkeys = "{lab_keys}"\n')
    marker = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_PAUSE_AT="stage:verify:written", ENGINE_PAUSE_FILE=str(marker))
    process = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox",
                                str(tmp_path / "outbox"), "--demo"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the engine never reached the pause point"
            time.sleep(0.1)
        assert list((tmp_path / "outbox" / ".work").glob("*/verify/*.png")), "no image signed yet"
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == process.pid]
        [signer_pid] = [pid for pid in children if b"engine.provenance.signer" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        secrets = _secrets(lab_keys)
        assert _found_in_memory(process.pid, secrets) == set()
        assert _found_in_memory(signer_pid, secrets), "the scan found no key in the signer either: it would not show one anywhere"
        open_files = {os.readlink(fd) for fd in Path(f"/proc/{process.pid}/fd").iterdir() if fd.exists()}
        assert not [f for f in open_files if f.startswith(str(lab_keys))], open_files
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_a_disk_fault_in_the_signer_reaches_the_engine_as_the_same_os_error(signer, tmp_path):
    """The signer writes signature.json and the journal line: when it cannot (here the journal's
    place is taken by a folder; on a full disk ENOSPC), the engine gets an OSError with the errno,
    which it classifies as it would its own (the job is held, nothing is lost), and nothing was
    journaled: the next try seals the same folder as if it were the first."""
    import errno

    outbox = tmp_path / "outbox"
    folder = _finished_work_folder(outbox, "job-6")
    journal_path(outbox).mkdir(parents=True)  # a folder where the journal file goes
    with pytest.raises(OSError) as fault:
        signer.seal(folder, outbox=outbox, where="outbox", path="dan/job-6", job_id="job-6", subject="dan")
    assert fault.value.errno == errno.EISDIR and fault.value.filename
    journal_path(outbox).rmdir()
    document = signer.seal(folder, outbox=outbox, where="outbox", path="dan/job-6", job_id="job-6", subject="dan")
    assert [line["job_id"] for line in read_journal(journal_path(outbox))] == ["job-6"] and document["signature"]
