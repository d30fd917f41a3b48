"""The lifecycle vocabularies are StrEnums whose values are what is on disk: the ledger,
the audit log, error.json, logs and metrics labels read exactly as before."""

from __future__ import annotations

import json

from engine.fsutil import canonical_json
from engine.ledger import Ledger
from engine.lifecycle import JobOutcome, LedgerOutcome, StageStatus


def test_members_are_their_plain_string_values_everywhere_they_are_written(tmp_path):
    assert [member.value for member in JobOutcome] == ["finished", "partial", "interrupted", "failed", "held", "lost"]
    assert JobOutcome.HELD == "held" and f"{JobOutcome.LOST}" == "lost" and str(StageStatus.COMPLETE) == "complete"
    assert json.dumps({"outcome": JobOutcome.FAILED}) == '{"outcome": "failed"}'
    assert canonical_json({"status": StageStatus.RUNNING}) == canonical_json({"status": "running"})
    ledger = Ledger.open(tmp_path / "state.json", "J1", "/inbox/alice")
    ledger.start("prepare", "f" * 64)
    ledger.set_outcome(LedgerOutcome.FINISHED)
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk["outcome"] == "finished" and on_disk["stages"][0]["status"] == "running"
    assert Ledger.open(tmp_path / "state.json", "J1", "").outcome == LedgerOutcome.FINISHED
