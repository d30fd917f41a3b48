"""The job's ledger, `state.json`: which stages are done, with which inputs, making which files.

It also holds the job's `inputs`: the Listing of its inputs/ copy of the dropped folder
(engine.jobfolder), as verified when the copy was made.

A stage's *fingerprint* hashes everything its result depends on (its own settings, code
version, model hashes, and the previous stage's fingerprint and artifacts). A completed
stage whose fingerprint still matches and whose artifacts are intact is skipped on a
re-run; the first stage that differs is re-done, and every stage after it with it.
Written atomically (temp file + fsync + rename) after every change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.fsutil import atomic_write_json, sha256_file
from engine.lifecycle import LedgerOutcome, StageStatus

LEDGER_VERSION = 2  # 2: inputs, and the work folder named by the job id alone


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    status: str  # StageStatus: "running" | "complete"
    artifacts: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    models: dict[str, str] = field(default_factory=dict)  # model file name -> sha256 it used

    def intact(self, job_dir: Path) -> bool:
        """Every artifact still exists with the recorded hash."""
        for rel, digest in self.artifacts.items():
            path = job_dir / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True


@dataclass
class Ledger:
    path: Path
    job_id: str
    source: str
    subject: str = ""  # known once job.toml was read
    kind: str = ""  # the job's kind (engine.kinds), known once job.toml was read; "" in older ledgers: replicate
    inputs: dict[str, str] = field(default_factory=dict)  # the Listing of inputs/: rel path -> sha256 | "dir" | "link:<target>"
    not_copied: list[str] = field(default_factory=list)  # special files of the dropped folder (pipes...): no content to keep
    stages: list[StageRecord] = field(default_factory=list)
    outcome: str = LedgerOutcome.RUNNING  # LedgerOutcome: running | finished | failed

    @classmethod
    def open(cls, path: Path, job_id: str, source: str) -> "Ledger":
        """Load the ledger at `path`, or start an empty one (not written until changed)."""
        if not path.exists():
            return cls(path=path, job_id=job_id, source=source)
        data = json.loads(path.read_text("utf-8"))
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"{path}: ledger version {data.get('version')} is not {LEDGER_VERSION}")
        return cls(
            path=path,
            job_id=data["job_id"],
            source=data["source"],
            subject=data.get("subject", ""),
            kind=data.get("kind", ""),
            inputs=data.get("inputs", {}),
            not_copied=data.get("not_copied", []),
            stages=[StageRecord(**record) for record in data["stages"]],
            outcome=data.get("outcome", LedgerOutcome.RUNNING),
        )

    def record(self, name: str) -> StageRecord | None:
        return next((r for r in self.stages if r.name == name), None)

    def drop_from(self, name: str) -> list[str]:
        """Forget `name` and every stage recorded after it; returns the names dropped."""
        index = next((i for i, r in enumerate(self.stages) if r.name == name), len(self.stages))
        dropped = [r.name for r in self.stages[index:]]
        del self.stages[index:]
        self.save()
        return dropped

    def start(self, name: str, fingerprint: str) -> None:
        self.drop_from(name)
        self.stages.append(StageRecord(name=name, fingerprint=fingerprint, status=StageStatus.RUNNING))
        self.save()

    def complete(self, name: str, artifacts: dict[str, str], models: dict[str, str]) -> None:
        record = self.record(name)
        assert record is not None and record.status == StageStatus.RUNNING, f"stage {name} was not started"
        record.status = StageStatus.COMPLETE
        record.artifacts = dict(sorted(artifacts.items()))
        record.models = dict(sorted(models.items()))
        self.save()

    def models(self) -> dict[str, str]:
        """Every model file the completed stages used (for the manifest)."""
        used: dict[str, str] = {}
        for record in self.stages:
            used.update(record.models)
        return dict(sorted(used.items()))

    def set_outcome(self, outcome: str) -> None:
        self.outcome = outcome
        self.save()

    def save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "version": LEDGER_VERSION,
                "job_id": self.job_id,
                "subject": self.subject,
                "kind": self.kind,
                "source": self.source,
                "inputs": self.inputs,
                "not_copied": self.not_copied,
                "outcome": self.outcome,
                "stages": [vars(r) for r in self.stages],
            },
        )

    @staticmethod
    def peek(path: Path) -> dict[str, Any] | None:
        """The raw ledger of another job folder (for finding a job to resume), or None."""
        try:
            return json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
