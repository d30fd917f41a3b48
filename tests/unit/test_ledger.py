"""The ledger is a checked cache of the audit chain (issue 30, "the share is hostile"): the chain
is read and verified line by line (a torn tail left out, a broken middle named), the ledger is
rebuilt from it, and what a stage run may read back is what its own lines recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.provenance.audit import AuditLog, read_chain, recorded_files, set_aside_damaged, stage_run_records
from engine.ledger import LEDGER_VERSION, Ledger
from engine.lifecycle import StageStatus

INPUTS = {"a.png": "a" * 64, "job.toml": "b" * 64}


def _job(folder: Path) -> tuple[Ledger, AuditLog]:
    """A job as the runner leaves it: prepare complete, embed running; ledger and audit written
    in the runner's order."""
    folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(path=folder / "state.json", job_id="job-1", source="/inbox/alice")
    ledger.save()
    ledger.inputs, ledger.not_copied = dict(INPUTS), ["fifo"]
    ledger.subject, ledger.kind = "alice", "replicate"
    ledger.save()
    audit = AuditLog(folder / "audit.jsonl", "job-1")
    audit.event("job_started", source="/inbox/alice", subject="alice", kind="replicate", inputs=dict(INPUTS), not_copied=["fifo"])
    for name, artifacts in (("prepare", {"prepared/a.png": "c" * 64}), ("embed", None)):
        ledger.start(name, f"fp-{name}")
        audit.event("stage_started", stage=name, fingerprint=f"fp-{name}", continues=False)
        if artifacts is not None:
            audit.event("stage_finished", stage=name, seconds=1.0, artifacts=artifacts, models={"m.onnx": "d" * 64})
            ledger.complete(name, artifacts, {"m.onnx": "d" * 64})
    return ledger, audit


def test_the_ledger_rebuilt_from_the_audit_equals_the_one_written(tmp_path):
    ledger, _ = _job(tmp_path / "job")
    rebuilt = Ledger.from_audit(ledger.path, "job-1", "/elsewhere", read_chain(tmp_path / "job" / "audit.jsonl").records)
    assert rebuilt.plain() == ledger.plain()
    assert rebuilt.source == "/inbox/alice"  # the first line that names one, not the caller's
    assert rebuilt.differences(ledger) == {}


def test_rebuilding_replays_invalidations_drops_and_a_finish_the_ledger_missed(tmp_path):
    ledger, audit = _job(tmp_path / "job")
    audit.event("stage_finished", stage="embed", seconds=1.0, artifacts={"embedding/e.npy": "e" * 64}, models={})
    # killed here: the ledger never heard of embed's finish
    records = read_chain(audit.path).records
    rebuilt = Ledger.from_audit(ledger.path, "job-1", "", records)
    assert [(r.name, r.status) for r in rebuilt.stages] == [("prepare", StageStatus.COMPLETE), ("embed", StageStatus.COMPLETE)]
    assert rebuilt.differences(ledger) == {"fields": ["stages"], "stages": ["prepare:complete", "embed:complete"],
                                           "other_stages": ["prepare:complete", "embed:running"]}
    audit.event("stage_invalidated", stage="embed", reason="outputs changed on disk", dropped=["embed"])
    assert [r.name for r in Ledger.from_audit(ledger.path, "job-1", "", read_chain(audit.path).records).stages] == ["prepare"]
    audit.event("stages_dropped", stages=["prepare"], reason="not stages of this job's kind")
    assert Ledger.from_audit(ledger.path, "job-1", "", read_chain(audit.path).records).stages == []


@pytest.mark.parametrize("damage", ["cut in half", "padded with NULs", "another version", "a list", "a stage of the wrong shape"])
def test_a_state_json_that_is_no_ledger_is_read_as_none_with_the_reason(tmp_path, damage):
    ledger, _ = _job(tmp_path / "job")
    text = ledger.path.read_bytes()
    broken = {"cut in half": text[:len(text) // 2], "padded with NULs": text + b"\0" * 4096,
              "another version": json.dumps({**ledger.plain(), "version": LEDGER_VERSION - 1}).encode(),
              "a list": b"[]", "a stage of the wrong shape": json.dumps({**ledger.plain(), "stages": [{"name": "x"}]}).encode()}[damage]
    ledger.path.write_bytes(broken)
    found, why = Ledger.read(ledger.path)
    assert found is None and why
    with pytest.raises(ValueError):
        Ledger.open(ledger.path, "job-1", "")


def test_peek_falls_back_to_the_audit_when_state_json_is_torn(tmp_path):
    ledger, _ = _job(tmp_path / "job-1")
    whole = Ledger.peek(ledger.path)
    ledger.path.write_bytes(ledger.path.read_bytes()[:40])
    peeked = Ledger.peek(ledger.path)
    assert peeked is not None and peeked["source"] == "/inbox/alice" and peeked["job_id"] == "job-1" and peeked["outcome"] == "running"
    assert peeked["stages"] == whole["stages"]
    (tmp_path / "job-1" / "audit.jsonl").unlink()
    assert Ledger.peek(ledger.path) is None


def test_read_chain_leaves_out_a_torn_or_nul_padded_tail_and_stops_at_an_edited_line(tmp_path):
    _, audit = _job(tmp_path / "job")
    whole = audit.path.read_bytes()
    count = len(read_chain(audit.path).records)
    assert count == 4 and read_chain(audit.path).broken_at is None
    audit.path.write_bytes(whole + b'{"event": "half a li')
    assert (len(read_chain(audit.path).records), read_chain(audit.path).torn_tail) == (count, True)
    audit.path.write_bytes(whole + b"\0" * 512)
    assert (len(read_chain(audit.path).records), read_chain(audit.path).broken_at) == (count, None)
    lines = whole.decode().splitlines()
    lines[1] = lines[1].replace('"fp-prepare"', '"fp-forged"')
    audit.path.write_text("\n".join(lines) + "\n")
    read = read_chain(audit.path)
    assert (read.broken_at, len(read.records)) == (2, 1) and "line edited" in read.problem
    assert read_chain(tmp_path / "nothing.jsonl").records == []


def test_a_damaged_chain_is_set_aside_never_deleted(tmp_path):
    _, audit = _job(tmp_path / "job")
    lines = audit.path.read_text().splitlines()
    del lines[1]
    audit.path.write_text("\n".join(lines) + "\n")
    data = audit.path.read_bytes()
    read = read_chain(audit.path)
    facts = set_aside_damaged(audit.path, read)
    assert not audit.path.exists()
    assert (tmp_path / "job" / facts["file"]).read_bytes() == data
    assert facts["file"].startswith("audit.jsonl.damaged-") and facts["size"] == len(data) and facts["broken_line"] == 2
    assert facts["lines_verified"] == 1


def test_a_stage_run_is_its_lines_from_the_start_that_did_not_continue_an_interrupted_one(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", "job-1")
    audit.event("stage_started", stage="train", fingerprint="fp-old", continues=False)
    audit.event("train_checkpoint", step=4, files={"checkpoints/train-000004.json": "1" * 64})
    audit.event("stage_started", stage="train", fingerprint="fp", continues=False)
    audit.event("train_checkpoint", step=4, files={"checkpoints/train-000004.json": "2" * 64})
    audit.event("stage_invalidated", stage="train", reason="interrupted", dropped=["train"])
    audit.event("stage_started", stage="train", fingerprint="fp", continues=True)
    audit.event("scratch_written", files={"checkpoints/train-000008.json": "3" * 64})
    records = read_chain(audit.path).records
    assert [r["event"] for r in stage_run_records(records, "fp")][0] == "stage_started" and len(stage_run_records(records, "fp")) == 5
    assert recorded_files(records, "fp") == {"checkpoints/train-000004.json": "2" * 64, "checkpoints/train-000008.json": "3" * 64}
    assert recorded_files(records, "fp-old") == {"checkpoints/train-000004.json": "1" * 64}  # its run, not this one's
    assert recorded_files(records, "fp-none") == {}
    audit.event("stage_started", stage="train", fingerprint="fp", continues=False)  # started afresh: nothing before it counts
    assert recorded_files(read_chain(audit.path).records, "fp") == {}
