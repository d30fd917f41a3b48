"""The job's ledger, `state.json`: which stages are done, with which inputs, making which files.

It also holds the job's `inputs`: the Listing of its inputs/ copy of the dropped folder
(engine.jobfolder), as verified when the copy was made.

A stage's *fingerprint* hashes everything its result depends on (its own settings, code
version, model hashes, and the previous stage's fingerprint and artifacts). A completed
stage whose fingerprint still matches and whose artifacts are intact is skipped on a
re-run; the first stage that differs is re-done, and every stage after it with it.
Written atomically (temp file + fsync + rename) after every change.

The ledger is a cache of the job's audit log, which holds every fact it records (job_started /
job_resumed: the inputs, subject, kind and source; stage_started, stage_finished,
stage_invalidated, stages_dropped: the stages). A resume trusts only the hash-checked audit
chain: `from_audit` rebuilds the ledger from it, and the runner compares the two (`differences`)
and goes on with the rebuilt one, so a torn, padded or edited state.json never fails a job.
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
        """Load the ledger at `path`, or start an empty one (not written until changed).
        ValueError when the file is not a ledger of this version (`read` says why)."""
        if not path.exists():
            return cls(path=path, job_id=job_id, source=source)
        ledger, why = cls.read(path)
        if ledger is None:
            raise ValueError(f"{path}: {why}")
        return ledger

    @classmethod
    def read(cls, path: Path) -> tuple["Ledger | None", str]:
        """The ledger at `path`, or (None, why it cannot be one: missing, torn, not JSON, padded
        with NULs, of another version, a field of the wrong type)."""
        try:
            data = json.loads(Path(path).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None, "missing"
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return None, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})"
        if not isinstance(data, dict):
            return None, f"not a JSON object ({type(data).__name__})"
        if data.get("version") != LEDGER_VERSION:
            return None, f"ledger version {data.get('version')!r} is not {LEDGER_VERSION}"
        try:
            ledger = cls(
                path=Path(path),
                job_id=data["job_id"],
                source=data["source"],
                subject=data.get("subject", ""),
                kind=data.get("kind", ""),
                inputs=data.get("inputs", {}),
                not_copied=data.get("not_copied", []),
                stages=[StageRecord(**record) for record in data["stages"]],
                outcome=data.get("outcome", LedgerOutcome.RUNNING),
            )
        except (KeyError, TypeError) as exc:
            return None, f"not a ledger ({type(exc).__name__}: {str(exc)[:200]})"
        if not all(isinstance(value, str) for value in (ledger.job_id, ledger.source, ledger.subject, ledger.kind, ledger.outcome)) \
                or not isinstance(ledger.inputs, dict) or not isinstance(ledger.not_copied, list) \
                or not all(isinstance(r.artifacts, dict) and isinstance(r.models, dict) for r in ledger.stages):
            return None, "not a ledger (a field of the wrong type)"
        return ledger, ""

    @classmethod
    def from_audit(cls, path: Path, job_id: str, source: str, records: list[dict[str, Any]]) -> "Ledger":
        """The ledger that the audit lines `records` (engine.provenance.audit.read_chain, checked) say, line
        by line as the runner wrote them: the job's inputs, subject and kind as its last
        job_started / job_resumed line recorded them; each stage as stage_started (drops it and
        every later stage, records it running), stage_finished (complete, with its artifacts
        and models), stage_invalidated (drops it and every later stage) and stages_dropped left
        it. `source`: the folder the job was first read from (the first line that names one;
        `source` when none does). A work-area ledger: its outcome is running."""
        ledger = cls(path=Path(path), job_id=job_id, source=source)
        named_source = False
        for record in records:
            event = record.get("event")
            if not named_source and isinstance(record.get("read_from") or record.get("source"), str):
                ledger.source, named_source = record.get("read_from") or record["source"], True
            if event in ("job_started", "job_resumed"):
                if "kind" in record:  # job.toml was read (a line without it came before a refusal)
                    ledger.subject, ledger.kind = str(record.get("subject", "")), str(record["kind"])
                if isinstance(record.get("inputs"), dict):
                    ledger.inputs = dict(record["inputs"])
                    ledger.not_copied = list(record.get("not_copied") or [])
            elif event == "stage_started":
                ledger._forget_from(str(record.get("stage")))
                ledger.stages.append(StageRecord(name=str(record.get("stage")), fingerprint=str(record.get("fingerprint")), status=StageStatus.RUNNING))
            elif event == "stage_finished":
                stage = ledger.record(str(record.get("stage")))
                if stage is not None and stage.status == StageStatus.RUNNING:
                    stage.status = StageStatus.COMPLETE
                    stage.artifacts = dict(sorted((record.get("artifacts") or {}).items()))
                    stage.models = dict(sorted((record.get("models") or {}).items()))
            elif event == "stage_invalidated":
                ledger._forget_from(str(record.get("stage")))
            elif event == "stages_dropped":
                dropped = set(record.get("stages") or [])
                ledger.stages = [stage for stage in ledger.stages if stage.name not in dropped]
        return ledger

    def differences(self, other: "Ledger") -> dict[str, Any]:
        """What differs between two ledgers of one job: {"fields": [names]}, with both stage lists
        ("name:status") when the stages differ; {} when they are the same."""
        mine, theirs = self.plain(), other.plain()
        fields = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
        if not fields:
            return {}
        out: dict[str, Any] = {"fields": fields}
        if "stages" in fields:
            out["stages"] = [f"{r.name}:{r.status}" for r in self.stages]
            out["other_stages"] = [f"{r.name}:{r.status}" for r in other.stages]
        return out

    def record(self, name: str) -> StageRecord | None:
        return next((r for r in self.stages if r.name == name), None)

    def drop_from(self, name: str) -> list[str]:
        """Forget `name` and every stage recorded after it; returns the names dropped."""
        dropped = self._forget_from(name)
        self.save()
        return dropped

    def _forget_from(self, name: str) -> list[str]:
        index = next((i for i, r in enumerate(self.stages) if r.name == name), len(self.stages))
        dropped = [r.name for r in self.stages[index:]]
        del self.stages[index:]
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

    def plain(self) -> dict[str, Any]:
        """state.json's content."""
        return {
            "version": LEDGER_VERSION,
            "job_id": self.job_id,
            "subject": self.subject,
            "kind": self.kind,
            "source": self.source,
            "inputs": self.inputs,
            "not_copied": self.not_copied,
            "outcome": self.outcome,
            "stages": [dict(vars(r)) for r in self.stages],
        }

    def save(self) -> None:
        atomic_write_json(self.path, self.plain())

    @staticmethod
    def peek(path: Path) -> dict[str, Any] | None:
        """The raw ledger of another job folder (for finding a job to resume, for `status`), or
        None. Read-only. When state.json is not even a JSON object (torn by a kill, padded with
        NULs), the ledger the job's audit log beside it says (`from_audit`: its job id, source,
        subject, kind and stages), or None when that has no line either."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        from engine.provenance.audit import read_chain
        from engine.layout import AUDIT_FILE

        try:
            records = read_chain(path.parent / AUDIT_FILE).records
        except OSError:
            return None
        if not records:
            return None
        return Ledger.from_audit(path, path.parent.name, "", records).plain()
