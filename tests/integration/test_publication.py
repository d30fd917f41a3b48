"""From a job's publishing rename on, it is published: whatever fails after it is a publication
problem, held and settled by the next run of the job id, never a job failure (issue 30: a job
that raised after its rename was also put into failed/ under the same id, and re-run in a loop)."""

from __future__ import annotations

import json

from engine.provenance.trust import journal_path, read_journal
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_JOB, make_job


def test_a_fault_after_the_publishing_rename_holds_the_job_and_the_next_run_settles_it(tmp_path, engine, astronaut_rgb, monkeypatch):
    source = make_job(tmp_path / "inbox" / "alice", {"photo.png": astronaut_rgb}, FAST_JOB)
    outbox = tmp_path / "outbox"
    # The published ledger cannot be written (the share failed right after the rename).
    monkeypatch.setenv("ENGINE_FAIL_WRITES", f"EIO:{outbox}/alice/*/state.json")
    held = engine.run_job(source, outbox)
    assert held.outcome == "held" and held.error["details"]["published_as"] == "finished", held.error
    published = outbox / "alice" / held.job_id
    assert held.output_dir == published and (published / "manifest.json").is_file()
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").rglob("error.json"))
    assert json.loads((published / "state.json").read_text())["outcome"] == "running"
    monkeypatch.delenv("ENGINE_FAIL_WRITES")
    settled = engine.run_job(source, outbox, job_id=held.job_id)
    assert (settled.outcome, settled.output_dir) == ("finished", published)
    assert json.loads((published / "state.json").read_text())["outcome"] == "finished"
    assert not any((tmp_path / "failed").rglob("error.json")) if (tmp_path / "failed").exists() else True
    assert [line["job_id"] for line in read_journal(journal_path(outbox))] == [held.job_id]
    assert verify_audit(published).ok


def test_the_daemon_holds_a_published_job_whose_run_raised_instead_of_counting_a_crash(tmp_path):
    """Issue 30 case 5's loop: the give-up check skips published jobs, so a published job that
    raised was re-run about once a second. Now: held, with the hold's back-off."""
    from types import SimpleNamespace

    import structlog

    from daemon.metrics import CRASHED
    from daemon.service import Service
    from engine.jobfolder import MANIFEST_FILE

    (tmp_path / "outbox" / "alice" / "job-1").mkdir(parents=True)
    (tmp_path / "outbox" / "alice" / "job-1" / MANIFEST_FILE).write_text("{}")
    daemon = Service.__new__(Service)
    daemon.paths = SimpleNamespace(outbox=tmp_path / "outbox", failed=tmp_path / "failed")
    log = structlog.get_logger("test")
    outcome, code, error = daemon._crashed(SimpleNamespace(job_id="job-1"), KeyError("hash"), log)
    assert (outcome, code) == ("held", "publication_incomplete") and error["details"]["published_as"] == "finished"
    assert daemon._crashed(SimpleNamespace(job_id="job-2"), KeyError("hash"), log)[0] == CRASHED  # not published: a crash
