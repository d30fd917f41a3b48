"""The hash chain and manifest catch every kind of edit, and name where it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.provenance.audit import GENESIS, AuditLog, line_hash
from engine.provenance.verification import verify_audit
from engine.errors import OwnershipLost
from engine.fsutil import tree_listing
from tests.harness.jobs import fake_finished_job


def test_intact_job_verifies(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    report = verify_audit(job)
    assert report.ok, report.problems
    assert report.lines == 3 and report.files_checked == 4  # 2 outputs, 2 dropped files
    lines = [json.loads(line) for line in (job / "audit.jsonl").read_text().splitlines()]
    assert lines[0]["prev"] == GENESIS
    assert all(lines[i]["prev"] == lines[i - 1]["hash"] for i in range(1, 3))
    assert all(line["hash"] == line_hash(line) for line in lines)
    assert report.head == lines[-1]["hash"]


def test_one_edited_byte_of_an_output_is_named(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    data = bytearray((job / "prepared" / "a.png").read_bytes())
    data[5] ^= 1
    (job / "prepared" / "a.png").write_bytes(bytes(data))
    assert verify_audit(job).problems == ["prepared/a.png: changed (sha256 differs from manifest)"]


def test_an_edited_audit_line_is_named(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    lines = (job / "audit.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"drift":0.125', '"drift":0.124')
    (job / "audit.jsonl").write_text("\n".join(lines) + "\n")
    problems = verify_audit(job).problems
    assert problems == ["audit.jsonl line 2: content does not match its hash (line edited)"]


def test_a_rehashed_line_breaks_the_next_link(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    lines = [json.loads(line) for line in (job / "audit.jsonl").read_text().splitlines()]
    lines[1]["drift"] = 0.0
    lines[1]["hash"] = line_hash(lines[1])  # a forger recomputes this line's hash...
    (job / "audit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert "line 3: 'prev' does not match" in verify_audit(job).problems[0]  # ...and the chain still breaks


def test_a_removed_line_is_named(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    lines = (job / "audit.jsonl").read_text().splitlines()
    (job / "audit.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert "line 2: 'prev' does not match" in verify_audit(job).problems[0]


def test_manifest_edit_added_and_missing_files(tmp_path):
    job = fake_finished_job(tmp_path / "job")
    manifest = json.loads((job / "manifest.json").read_text())
    manifest["outputs"]["report.json"] = "ff" * 32
    (job / "manifest.json").write_text(json.dumps(manifest))
    assert "manifest.json changed" in verify_audit(job).problems[0]

    job2 = fake_finished_job(tmp_path / "job2")
    (job2 / "extra.txt").write_text("planted")
    (job2 / "report.json").unlink()
    assert verify_audit(job2).problems == ["report.json: missing", "extra.txt: not in the manifest (added after the job finished)"]


def test_unfinished_job_is_not_ok(tmp_path):
    folder = tmp_path / "job"
    AuditLog(folder / "audit.jsonl", "j").event("job_started")
    assert "no job_finished event" in verify_audit(folder).problems[0]


def test_torn_last_line_is_cut_and_recorded_on_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "j")
    log.event("one")
    with open(path, "ab") as handle:  # a crash in the middle of writing line 2
        handle.write(b'{"event":"two","job_')
    reopened = AuditLog(path, "j")
    reopened.event("three")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["one", "audit_torn_line_removed", "three"]
    assert lines[1]["removed_bytes"] == len(b'{"event":"two","job_')
    assert lines[1]["prev"] == lines[0]["hash"]


def test_chain_continues_across_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path, "j").event("one")
    AuditLog(path, "j").event("two")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1]["prev"] == lines[0]["hash"]


def test_non_finite_and_numpy_values_are_recorded_as_plain_json(tmp_path):
    import numpy as np

    path = tmp_path / "audit.jsonl"
    AuditLog(path, "j").event("values", nan=float("nan"), arr=np.arange(3), f=np.float32(0.5), p=Path("/x"))
    line = json.loads(path.read_text())
    assert (line["nan"], line["arr"], line["f"], line["p"]) == (None, [0, 1, 2], 0.5, "/x")


def test_cli_exit_codes(tmp_path):
    from engine.__main__ import main

    job = fake_finished_job(tmp_path / "job")
    assert main(["verify-audit", str(job)]) == 0
    (job / "report.json").write_text("{}")
    assert main(["verify-audit", str(job)]) == 1


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1,2]\n"])
def test_garbage_line_is_named(tmp_path, garbage):
    job = fake_finished_job(tmp_path / "job")
    with open(job / "audit.jsonl", "ab") as handle:
        handle.write(garbage)
    assert "line 4: not a JSON object" in verify_audit(job).problems[0]


@pytest.mark.parametrize("edit, problem", [
    (lambda inputs: (inputs / "a.jpg").write_bytes(b"another photo"), "inputs/a.jpg: changed (differs from the manifest's inputs)"),
    (lambda inputs: (inputs / "notes" / "n.txt").unlink(), "inputs/notes/n.txt: missing (the manifest lists it as dropped)"),
    (lambda inputs: (inputs / "b.jpg").write_bytes(b"slipped in"), "inputs/b.jpg: not in the manifest's inputs (added after the job finished)"),
])
def test_the_dropped_files_kept_in_inputs_are_checked(tmp_path, edit, problem):
    job = fake_finished_job(tmp_path / "job")
    edit(job / "inputs")
    assert verify_audit(job).problems == [problem]


def test_a_line_from_a_stale_owner_after_its_successor_is_named(tmp_path):
    """A daemon that lost its claim (generation 1) and wrote after the one that took over (2)."""
    folder = tmp_path / "job"
    folder.mkdir()
    AuditLog(folder / "audit.jsonl", "job-1", fence=1).event("job_started")
    AuditLog(folder / "audit.jsonl", "job-1", fence=2).event("job_resumed")
    AuditLog(folder / "audit.jsonl", "job-1", fence=1).event("stage_finished", stage="prepare")
    problems = verify_audit(folder).problems
    assert problems[0] == ("audit.jsonl line 3: written by the job's owner of generation 1 after one of generation 2 "
                           "(a daemon that had lost its claim kept writing)")


def test_a_second_writer_of_one_log_is_stopped_before_it_forks_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    first, second = AuditLog(path, "job-1", fence=1), None
    first.event("job_started")
    second = AuditLog(path, "job-1", fence=2)  # took the job over: it read the head so far
    second.event("job_resumed")
    with pytest.raises(OwnershipLost):
        first.event("stage_finished")  # the old owner, unaware: refused, nothing written
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and verify_audit(tmp_path).problems == ["audit.jsonl: no job_finished event (job incomplete)"]


def test_audit_lines_are_written_whatever_the_log_level(tmp_path):
    """The CLI's --log-level warning once filtered every audit event (all "info") out."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        AuditLog(tmp_path / "audit.jsonl", "job-1").event("job_started")
    finally:
        structlog.reset_defaults()
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("tail", [b'{"ts": "2026-', b"\x00" * 512, b"\x00" * 64 + b"\n", b"not json\n"],
                         ids=["torn line", "NUL padding", "NUL line", "garbage line"])
def test_a_bad_tail_of_the_audit_log_is_cut_off_at_the_next_open_and_the_cut_recorded(tmp_path, tail):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "j")
    log.event("job_started")
    head = log.event("stage_finished", stage="prepare")
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    reopened = AuditLog(path, "j")
    assert reopened.head != head  # the cut itself is the next line of the chain
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.read_bytes().startswith(whole) and len(lines) == 3
    assert lines[2]["event"] == "audit_torn_line_removed" and lines[2]["removed_bytes"] == len(tail) and lines[2]["prev"] == head
    assert verify_audit(tmp_path).problems == ["audit.jsonl: no job_finished event (job incomplete)"]


def test_a_failed_job_keeps_a_damaged_chain_set_aside_sealed_with_it(tmp_path):
    from engine.jobfolder import publish_failure
    from engine.provenance.signer import Sealer

    work = tmp_path / "outbox" / ".work" / "job-9"
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "a.txt").write_text("as dropped")
    AuditLog(work / "audit.jsonl", "job-9").event("job_started", inputs=tree_listing(work / "inputs").entries)
    damaged = "audit.jsonl.damaged-20260101T000000.000000Z"
    (work / damaged).write_text("a chain someone edited")

    def seal(staging):
        Sealer(None).seal(staging, outbox=tmp_path / "outbox", where="failed", path="s/job-9", job_id="job-9", subject="s")
    target, _record = publish_failure(inputs_from=work / "inputs", failed_root=tmp_path / "failed", subject="s", job_id="job-9",
                                      record={"code": "internal_error"}, audit=work / "audit.jsonl", seal=seal)
    report = verify_audit(target)
    assert report.ok and report.verdict == "failed", report.problems
    assert damaged in json.loads((target / "manifest.json").read_text())["outputs"]
    (target / damaged).write_text("changed again")
    assert verify_audit(target).problems[0] == f"{damaged}: changed (sha256 differs from the failed job's manifest)"


def test_a_resume_trusts_only_the_witnessed_prefix_and_never_a_range_found_unwitnessed(tmp_path):
    """engine.provenance.verification.trusted_records, with a real signer's rules (engine.provenance.signer.Sealer) in process."""
    import base64

    from engine.provenance.audit import read_chain
    from engine.provenance.verification import trusted_records
    from engine.jobfolder import WITNESS_FILE
    from engine.provenance.signer import Sealer
    from engine.provenance.trust import LabKeys, make_lab_keys, witness_statement

    make_lab_keys(tmp_path / "keys")
    keys = LabKeys.load(tmp_path / "keys")
    sealer, outbox = Sealer(keys), tmp_path / "outbox"
    work = outbox / ".work" / "j"
    work.mkdir(parents=True)

    def witness(head, lines):
        return sealer.witness("j", outbox, head, lines)

    def trusted():
        return trusted_records(read_chain(work / "audit.jsonl").records, work / WITNESS_FILE, "j", keys.public_key)

    log = AuditLog(work / "audit.jsonl", "j", witness=witness)
    log.event("job_started")
    log.event("stage_started", stage="train", fingerprint="f")
    log.event("phase_started", phase="P")  # not a line a resume reads: not witnessed on its own
    log.event("train_checkpoint", files={"c": "1" * 64}, step=1)
    AuditLog(work / "audit.jsonl", "j").event("train_checkpoint", files={"c": "2" * 64}, step=2)  # appended by someone without the key
    lines, suffix = trusted()
    assert [r.get("step") for r in lines] == [None, None, None, 1] and suffix == (5, 5)
    assert trusted_records(read_chain(work / "audit.jsonl").records, work / WITNESS_FILE, "j", None)[1] is None  # no key: all of it

    resumed = AuditLog(work / "audit.jsonl", "j", witness=witness)  # the next run declares the range, and goes on
    resumed.event("unwitnessed_lines", from_line=5, to_line=5)
    resumed.event("stage_started", stage="train", fingerprint="f", continues=True)
    lines, suffix = trusted()
    assert suffix is None and [r.get("step") for r in lines if r["event"] == "train_checkpoint"] == [1]  # covered, still not trusted

    head = read_chain(work / "audit.jsonl").records[-1]["hash"]
    (work / WITNESS_FILE).write_text(json.dumps({"statement": witness_statement("j", head, 7), "signature": base64.b64encode(bytes(64)).decode()}) + "\n")
    assert trusted() == ([], (1, 7))  # witnesses written without the key vouch for nothing
