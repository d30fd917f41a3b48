"""Where jobs stand, for a person at a terminal.

- `outbox_status` / `format_status`: `python -m engine status --outbox DIR` reads only the disk:
  the inbox's waiting folders (the queue), the work area's ledgers (<outbox>/.work/*/state.json)
  and audit logs (jobs in progress: stage, phase, last event), finished jobs' drift_report.json
  (lock state) and failed jobs' error.json.
- `StageProgress`: how far the long stages are (training steps, seed renders, render passes),
  from the engine's observer events; the daemon's metrics read it too.
- `ProgressObserver`: an Engine observer for the CLI: a progress bar per long stage when stderr
  is a terminal; elsewhere a `progress` log line at most every `every_seconds`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog

from engine.jobfolder import AUDIT_FILE, ERROR_FILE, JOB_FILE, LEDGER_FILE, MANIFEST_FILE, WORK_DIR, find_published, is_hidden_name
from engine.kinds import DEFAULT_KIND, all_stage_names, known_kinds, kind_named, progress_units
from engine.kinds.sections import CONTROL_GROUP, IDENTITY_METHODS
from engine.layout import DRIFT_REPORT_JSON, RENDERS_DIR, VERIFY_DIR
from engine.ledger import Ledger
from engine.schema import from_plain
_TAIL_BYTES = 64 * 1024


# ---------------------------------------------------------------------------- status on disk

@dataclass
class Running:
    subject: str
    job_id: str
    stage: str | None  # the stage running (or next to run)
    stages_done: int
    state: str  # running | interrupted | paused | stopped
    detail: str  # e.g. "phase MID since step 12 (max 1200)"
    last_event: str
    last_event_ts: str | None
    kind: str = DEFAULT_KIND
    stages_total: int = 0  # of the job's kind


@dataclass
class Result:
    subject: str
    job_id: str
    outcome: str  # finished | failed
    finished_ts: str | None
    lock: str | None = None  # locked | not_locked
    best_seed: int | None = None
    best_drift: float | None = None
    scored: int = 0
    faces_not_found: int = 0
    disagreements: int | None = None
    error: str | None = None
    path: str = ""
    kind: str = DEFAULT_KIND


@dataclass
class Status:
    outbox: Path
    queue: list[str] = field(default_factory=list)
    inbox: Path | None = None
    running: list[Running] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    def to_plain(self) -> dict[str, Any]:
        return {"outbox": str(self.outbox), "inbox": None if self.inbox is None else str(self.inbox), "queue": self.queue,
                "running": [vars(r) for r in self.running], "results": [vars(r) for r in self.results]}


def outbox_status(outbox: Path, *, inbox: Path | None = None, failed: Path | None = None, last: int = 10) -> Status:
    """What is waiting, in progress and done, from the folders alone (no daemon needed)."""
    outbox = Path(outbox)
    failed = Path(failed) if failed is not None else outbox.parent / "failed"
    status = Status(outbox=outbox, inbox=inbox)
    if inbox is not None and Path(inbox).is_dir():
        status.queue = sorted(p.name for p in Path(inbox).iterdir() if p.is_dir() and not is_hidden_name(p.name) and (p / JOB_FILE).is_file())
    for ledger_path in sorted((outbox / WORK_DIR).glob(f"*/{LEDGER_FILE}")):
        if find_published(outbox, failed, ledger_path.parent.name) is not None:
            continue  # a leftover of a published job (a kill right after publishing): the next run of it removes it
        running = _running(ledger_path)
        if running is not None:
            status.running.append(running)
    results = [_finished(path.parent) for path in (outbox.glob(f"*/*/{MANIFEST_FILE}") if outbox.is_dir() else [])
               if not is_hidden_name(path.parent.parent.name)]  # not the work area's: a job there is not published yet
    results += [_failed(path.parent) for path in (failed.glob(f"*/*/{ERROR_FILE}") if failed.is_dir() else [])]
    results.sort(key=lambda r: (r.finished_ts or "", r.job_id), reverse=True)
    status.results = results[:last]
    return status


def _running(ledger_path: Path) -> Running | None:
    ledger = Ledger.peek(ledger_path)  # a torn state.json: what the job's audit log says
    if not ledger or ledger.get("outcome") != "running":
        return None
    stages = ledger.get("stages", [])
    done = [s["name"] for s in stages if s.get("status") == "complete"]
    in_flight = next((s["name"] for s in stages if s.get("status") == "running"), None)
    kind = ledger.get("kind") or DEFAULT_KIND  # older ledgers have none: they are replicate jobs
    names = kind_named(kind).stages if kind in known_kinds() else all_stage_names()
    stage = in_flight or next((name for name in names if name not in done), None)
    lines = _audit_tail(ledger_path.parent / AUDIT_FILE)
    last = lines[-1] if lines else {}
    state = {"job_interrupted": "interrupted", "job_paused": "paused", "job_stopped": "stopped", "job_held": "held"}.get(last.get("event", ""), "running")
    return Running(subject=ledger.get("subject") or "?", job_id=ledger.get("job_id", ledger_path.parent.name),
                   stage=stage, stages_done=len(done), state=state,
                   detail=f"{last.get('code')}: {last.get('message')}" if state == "held" else _stage_detail(stage, lines, ledger_path.parent),
                   last_event=last.get("event", "—"), last_event_ts=last.get("ts"), kind=kind, stages_total=len(names))


def _stage_detail(stage: str | None, lines: list[dict[str, Any]], job_dir: Path) -> str:
    """What can be said from disk about the stage in flight."""
    if stage == "train":
        phase = next((line for line in reversed(lines) if line.get("event") in ("phase_started", "phase_exit", "train_resumed")), None)
        if phase is None:
            return "training: starting"
        if phase["event"] == "phase_exit":
            return f"training: phase {phase.get('phase')} ended at step {phase.get('step')} ({phase.get('reason')})"
        if phase["event"] == "train_resumed":
            return f"training: resumed at step {phase.get('step')}"
        return f"training: phase {phase.get('phase')} since step {phase.get('step')}"
    if stage == "verify":
        rendered = len(list((job_dir / VERIFY_DIR).glob("*.png")))
        return f"seed discovery: {rendered} candidate renders written"
    if stage == "render":
        rendered = len(list((job_dir / RENDERS_DIR).glob("*.png")))
        return f"rendering: {rendered} images written"
    return ""


def _finished(job_dir: Path) -> Result:
    """A published job (its manifest is there); the lock state from its drift report, when its kind writes one."""
    kind = (_read_json(job_dir / MANIFEST_FILE) or {}).get("kind") or DEFAULT_KIND
    report = _read_json(job_dir / DRIFT_REPORT_JSON) or {}
    selection = report.get("seed_selection") or {}
    second = report.get("identity2") or {}
    rows = report.get("renders", [])
    return Result(
        subject=job_dir.parent.name, job_id=job_dir.name, outcome="finished", finished_ts=_last_ts(job_dir / AUDIT_FILE),
        lock=selection.get("status"), best_seed=selection.get("best_seed"), best_drift=selection.get("best_drift"),
        scored=sum(1 for r in rows if r.get("drift") is not None), faces_not_found=int(report.get("faces_not_found", 0)),
        disagreements=second.get("disagreements") if second.get("measured") else None, path=str(job_dir), kind=kind,
    )


def _failed(job_dir: Path) -> Result:
    error = _read_json(job_dir / ERROR_FILE) or {}
    return Result(subject=job_dir.parent.name, job_id=job_dir.name, outcome="failed", finished_ts=error.get("failed_at") or _last_ts(job_dir / AUDIT_FILE),
                  error=f"{error.get('code', '?')}: {error.get('message', '')}", path=str(job_dir))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _audit_tail(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of the last 64 KiB of an audit log (cheap on long logs)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            data = handle.read()
    except OSError:
        return []
    raw_lines = data.split(b"\n")
    if size > _TAIL_BYTES:
        raw_lines = raw_lines[1:]  # the first may be cut
    lines = []
    for raw in raw_lines:
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _last_ts(path: Path) -> str | None:
    lines = _audit_tail(path)
    return lines[-1].get("ts") if lines else None


def format_status(status: Status, now: dt.datetime | None = None) -> str:
    """The status as lines for a terminal (80 columns where it can)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    out = [f"outbox {status.outbox}"]
    if status.inbox is not None:
        waiting = ", ".join(status.queue[:8]) + (f", ... ({len(status.queue) - 8} more)" if len(status.queue) > 8 else "")
        out.append(f"queue: {len(status.queue)} folder(s) waiting in {status.inbox}" + (f": {waiting}" if status.queue else ""))
    out.append("")
    out.append(f"in progress: {len(status.running) or 'none'}")
    for job in status.running:
        kind = f"  {job.kind}" if job.kind != DEFAULT_KIND else ""  # the default kind goes without saying
        out.append(f"  {job.subject}  {job.job_id}{kind}  {job.state}  stage {stage_position(job)}")
        if job.detail:
            out.append(f"      {job.detail}")
        out.append(f"      last event {job.last_event} {_ago(job.last_event_ts, now)}")
    out.append("")
    out += format_results(status.results)
    return "\n".join(out) + "\n"


def format_results(results: list[Result]) -> list[str]:
    """Finished and failed jobs, one line each (shared with `python -m daemon status`)."""
    out = [f"last {len(results)} result(s), newest first:"]
    for result in results:
        when = (result.finished_ts or "")[:19].replace("T", " ")
        if result.outcome == "failed":
            out.append(f"  {when}  {result.subject}  {result.job_id}  FAILED  {result.error}")
            continue
        if result.kind != DEFAULT_KIND and not result.lock:  # a kind without seed discovery: nothing locked to show
            out.append(f"  {when}  {result.subject}  {result.job_id}  {result.kind}  FINISHED")
            continue
        drift = "—" if result.best_drift is None else f"{result.best_drift:.4f}"
        second = "" if result.disagreements is None else f"  models disagree on {result.disagreements}"
        out.append(f"  {when}  {result.subject}  {result.job_id}  {(result.lock or '?').upper()}  seed {result.best_seed} drift {drift}  "
                   f"scored {result.scored}, no face {result.faces_not_found}{second}")
    return out


def stage_position(job: Running) -> str:
    """e.g. "train (3/5)", or what a job past its last stage is doing."""
    return f"{job.stage} ({job.stages_done + 1}/{job.stages_total})" if job.stage else "all stages done, publishing"


def _ago(ts: str | None, now: dt.datetime) -> str:
    if not ts:
        return ""
    try:
        seconds = (now - dt.datetime.fromisoformat(ts)).total_seconds()
    except ValueError:
        return f"at {ts}"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


# ---------------------------------------------------------------------------- live progress

LORA_GROUP = IDENTITY_METHODS[0]  # seed discovery's group with the job's LoRA alone


def seed_group(fields: dict) -> str:
    """The seed-discovery group a `seed_scored` record is of (the identity method, or the control).
    A record from before [identity] names none: its `lora` flag tells the LoRA from the control."""
    return str(fields.get("group") or (LORA_GROUP if fields.get("lora") else CONTROL_GROUP))


class StageProgress:
    """How far the long stages are, from the engine's observer events: training steps (of the
    job's step cap: phases may converge sooner), seed renders (LoRA + control) and render
    passes. Shared by the CLI's progress display and the daemon's metrics.

    `update(event, fields)` returns True when `done` moved. Totals come from the job's spec in
    the job_started/job_resumed event, counted by its kind (engine.kinds.Kind.planned_work)."""

    @staticmethod
    def long_stages() -> tuple[str, ...]:
        """The stages whose work some kind counts (engine.kinds.Kind.progress)."""
        return tuple(progress_units())

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {}
        self.kind = DEFAULT_KIND
        self.stage: str | None = None
        self.total: int | None = None
        self.done = 0
        self.at = ""  # what the last unit of work was, e.g. "MID loss 0.0123" or "seed 3 control"
        self._runs: list[str] = []  # the training runs seen in this stage ("" the job's LoRA, then an evaluate group's)

    def update(self, event: str, fields: dict[str, Any]) -> bool:
        if event in ("job_started", "job_resumed"):
            self.spec = fields.get("spec") or {}
            self.kind = str(fields.get("kind") or DEFAULT_KIND)
        elif event == "stage_started":
            self.stage, self.done, self.at, self._runs = fields.get("stage"), 0, "", []
            self.total = self.stage_total(self.kind, self.spec, self.stage)
        elif event in ("train_step", "train_resumed") and self.stage == "train":
            run = str(fields.get("run", ""))  # an evaluate group's LoRA counts on from the runs before it
            if run not in self._runs:
                self._runs.append(run)
            base = self._runs.index(run) * int((self.spec.get("train") or {}).get("max_steps", 0))
            at = f"{fields.get('phase')} loss {fields.get('loss', float('nan')):.4f}" if event == "train_step" else "resumed"
            return self._advance(base + int(fields.get("step", 0)), (f"{run}: " if run else "") + at)
        elif event == "mine_candidate" and self.stage == "mine":
            return self._advance(self.done + 1, f"candidate seed {fields.get('seed')}")
        elif event == "evaluate_cell" and self.stage == "evaluate":
            return self._advance(self.done + 1, f"{fields.get('group')} p{fields.get('prompt_index')} seed {fields.get('seed')}")
        elif event == "seed_scored" and self.stage == "verify":
            return self._advance(self.done + 1, f"seed {fields.get('seed')} {seed_group(fields)}")
        elif event == "render_scored" and self.stage == "render":
            return self._advance(self.done + 1, str(fields.get("pass_name", "")))
        elif event == "retouch_variant" and self.stage == "retouch":
            return self._advance(self.done + 1, f"{fields.get('region_set')} s {fields.get('strength')} seed {fields.get('seed')}")
        elif event in ("stage_finished", "job_failed", "job_interrupted", "job_stopped", "job_finished"):
            self.stage = None
        return False

    @staticmethod
    def stage_total(kind: str, spec: dict[str, Any], stage: str | None) -> int | None:
        """The work `stage` of a job of `kind` plans, from the job's plain spec (as its job_started
        event gives it); None when not counted, or the record does not fit its kind."""
        if stage is None or kind not in known_kinds():
            return None
        job_kind = kind_named(kind)
        try:
            return job_kind.planned_work(from_plain(job_kind.spec, spec), stage)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def _advance(self, done: int, at: str) -> bool:
        self.done, self.at = done, at
        return True


class ProgressObserver:
    """Engine observer for the CLI: progress of training steps, seed renders and render passes.

    On a terminal, a tqdm bar per stage on `stream`; otherwise a `progress` log event at most
    every `every_seconds` (and at the end of each stage), so long runs show life in logs too."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None, every_seconds: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_seconds = every_seconds
        self.progress = StageProgress()
        self._stage: str | None = None  # the stage whose bar or log lines are open
        self._shown = 0
        self._bar: Any = None
        self._last_log = 0.0
        self._log = structlog.get_logger("engine.progress")

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        progress = self.progress
        if event == "stage_started" or (event in ("stage_finished", "job_failed", "job_interrupted", "job_stopped", "job_finished")):
            self._close(finished=event == "stage_finished")
        moved = progress.update(event, fields)
        if event == "stage_started":
            self._open(progress.stage)
        elif moved and self._stage == progress.stage:
            self._advance()

    def _open(self, stage: str | None) -> None:
        self._stage, self._shown = stage, 0
        self._last_log = time.monotonic()
        units = progress_units()
        if self.interactive and stage in units:
            from tqdm import tqdm

            unit = units[stage]
            self._bar = tqdm(total=self.progress.total, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True, leave=True)

    def _advance(self) -> None:
        progress = self.progress
        if self._bar is not None:
            self._bar.update(progress.done - self._shown)
            self._bar.set_postfix_str(progress.at, refresh=False)
        elif time.monotonic() - self._last_log >= self.every_seconds:
            self._last_log = time.monotonic()
            self._log.info("progress", stage=self._stage, done=progress.done, total=progress.total, at=progress.at)
        self._shown = progress.done

    def _close(self, finished: bool = False) -> None:
        if self._bar is not None:
            if finished and self._bar.total and self._bar.n < self._bar.total:
                # Training that converged before its step cap: done is done, the bar ends at 100 %.
                self._bar.total = self._bar.n
                self._bar.refresh()
            self._bar.close()
            self._bar = None
        elif self._stage in progress_units() and self._shown:
            self._log.info("progress", stage=self._stage, done=self._shown, total=self.progress.total, at=self.progress.at)
        self._stage = None
