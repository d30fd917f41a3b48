"""The lifecycle vocabularies: a job run's outcome, the ledger's outcome, a stage's status.
`StrEnum`s, so each member is its own value as a string ("finished" == JobOutcome.FINISHED,
json writes "finished"): what is on disk, in logs and metrics does not change."""

from __future__ import annotations

from enum import StrEnum


class JobOutcome(StrEnum):
    """How one run of a job ended (JobResult.outcome)."""

    FINISHED = "finished"  # published to the outbox
    PARTIAL = "partial"  # stopped after --until's stage, in the work area
    INTERRUPTED = "interrupted"  # stop requested: resumable
    FAILED = "failed"  # refused or failed: published to failed/
    HELD = "held"  # the disk, share or permissions failed it: resumable, nothing lost
    LOST = "lost"  # another owner took the job over: this process wrote nothing more


class LedgerOutcome(StrEnum):
    """state.json's outcome."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class StageStatus(StrEnum):
    """A stage's record in state.json."""

    RUNNING = "running"
    COMPLETE = "complete"
