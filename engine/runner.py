"""The sequential engine: one job folder in, one verifiable result folder out.

Lifecycle on disk (each a folder you can look at):
    <outbox>/.work/<subject>/<job-id>/   while running (ledger state.json, audit.jsonl)
    <outbox>/<subject>/<job-id>/         finished: renamed here in one step, manifest written
    <failed>/<subject>/<job-id>/         refused or failed: a copy of the inputs + error.json + audit.jsonl
The source folder is only read, never changed. A crash at any point costs at most the stage
in flight: running the same folder again finds the unfinished job by its source path and
resumes from the ledger.
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib.metadata
import os
import platform
import secrets
import shutil
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from engine.audit import AUDIT_FILE, LEDGER_FILE, MANIFEST_FILE, AuditLog, Observer, jsonable, write_manifest
from engine.config import Settings
from engine.context import JobInterrupted, Resources, StageContext
from engine.errors import ConfigError, JobError
from engine.faults import pause_point
from engine.fsutil import (atomic_write_json, canonical_json, copy_folder_as_dropped, fsync_dir, hash_tree, remove_partial_writes, sha256_bytes,
                           sha256_file)
from engine.job import JOB_FILE, LoadedJob, is_hidden_name, load_job, safe_subject_name
from engine.ledger import Ledger
from engine.report import write_report
from engine.schema import to_plain
from engine.stages import STAGE_NAMES, STAGES

WORK_DIR = ".work"
ERROR_FILE = "error.json"
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "insightface", "onnxruntime", "rembg", "numpy", "pillow", "opencv-python-headless", "scipy")

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class JobResult:
    job_id: str
    subject: str
    outcome: str  # "finished" | "partial" (stopped by --until) | "interrupted" (stop requested) | "failed"
    output_dir: Path
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"


class Engine:
    """Runs jobs one after another, keeping models loaded between them."""

    def __init__(self, settings: Settings | None = None, *, demo: bool = False, observer: Observer | None = None) -> None:
        self.settings = settings or Settings.load(None)
        # The tiny demo model is used only when asked for: --demo, or models.base = "demo".
        self.demo = demo or self.settings.models.base == "demo"
        self.observer = observer
        self.resources = Resources(self.settings, demo=self.demo)
        # Set from another thread (a signal handler) to stop the job in flight at its next
        # safe point; the job stays in the work area and resumes on the next run.
        self.stop_requested = threading.Event()
        self.check_installation()

    def check_installation(self) -> None:
        """Refuse to start (ConfigError naming what to stage where) rather than fail jobs later.

        The base diffusion model must be staged (or --demo asked for); the realism model is
        checked when a job asks for two_pass."""
        self.resources.faces()
        self.resources.model_ref("base")
        self._apply_cpu_threads()

    def _apply_cpu_threads(self) -> None:
        """torch's intra-op thread count on the CPU (`models.cpu_threads`), in the calling
        thread: OpenMP keeps it per thread, and a thread torch has not seen yet (the daemon runs
        each job in a new worker thread) starts with every core. A checkpoint resumes
        bit-exactly only under the thread count it was written with (FINDINGS)."""
        from engine.models import select_device_dtype

        device, _ = select_device_dtype(self.settings)
        if device.type == "cpu" and self.settings.models.cpu_threads:
            import torch

            torch.set_num_threads(self.settings.models.cpu_threads)

    def run_job(self, source: Path, outbox: Path, *, job_id: str | None = None, until: str | None = None,
                failed_dir: Path | None = None) -> JobResult:
        """Run (or resume) the job in folder `source`; results go under `outbox`.

        until      the last stage to run (a name from STAGE_NAMES); the job then stays in the work area.
        job_id     resume or create this job; by default the unfinished job of the same source
                   folder is resumed, or a new id is made. An id already published in the
                   outbox (a run killed after its publishing rename) is returned as finished.
        failed_dir where refused/failed jobs go; by default `failed/` beside the outbox.
        """
        source, outbox = Path(source).resolve(), Path(outbox).resolve()
        self._apply_cpu_threads()
        failed_root = Path(failed_dir).resolve() if failed_dir else outbox.parent / "failed"
        if until is not None and until not in STAGE_NAMES:
            raise ValueError(f"unknown stage {until!r}; stages are {', '.join(STAGE_NAMES)}")
        job_id = job_id or find_unfinished_job(outbox, source) or new_job_id()
        bound = log.bind(job_id=job_id)
        try:
            job = load_job(source, self.settings.job_defaults, self.settings.input.extensions, self.settings.render.denylist)
        except JobError as error:
            subject = safe_subject_name(source.name)
            job_dir = outbox / WORK_DIR / subject / job_id
            audit = AuditLog(job_dir / AUDIT_FILE, job_id, self.observer)
            audit.event("job_started", source=str(source), subject=subject, inputs=_folder_hashes(source), versions=software_versions(), demo=self.demo)
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, None, bound)
        subject = job.subject
        if (outbox / subject / job_id / MANIFEST_FILE).is_file():
            return self._already_published(outbox / subject / job_id, bound.bind(subject=subject))
        job_dir = outbox / WORK_DIR / subject / job_id
        ledger = Ledger.open(job_dir / LEDGER_FILE, job_id, subject, str(source))
        resumed = (job_dir / AUDIT_FILE).exists()
        audit = AuditLog(job_dir / AUDIT_FILE, job_id, self.observer)
        bound = bound.bind(subject=subject)
        ctx = StageContext(job=job, job_id=job_id, job_dir=job_dir, settings=self.settings, resources=self.resources, audit=audit, demo=self.demo,
                           log=bound, observer=self.observer, stop_requested=self.stop_requested)
        try:
            inputs = input_hashes(job)
            audit.event(
                "job_resumed" if resumed else "job_started",
                source=str(source), subject=subject, inputs=inputs, spec=to_plain(job.spec), settings=self.settings.to_plain(),
                versions=software_versions(), models=self._model_facts(), device=device_facts(), demo=self.demo,
                completed_stages=[r.name for r in ledger.stages if r.status == "complete"],
            )
            bound.info("job_resumed" if resumed else "job_started", source=str(source))
            if resumed:
                # A killed run leaves the temporary files of the atomic writes it was in the
                # middle of (state.json's, a report image's...): they must not be published.
                partial = remove_partial_writes(job_dir)
                if partial:
                    audit.event("partial_writes_removed", files=partial)
            self._run_stages(ctx, ledger, inputs, until)
            if until is not None and until != STAGE_NAMES[-1]:
                audit.event("job_paused", until=until)
                return JobResult(job_id, subject, "partial", job_dir)
            return self._finish(ctx, ledger, inputs, outbox)
        except JobInterrupted as stop:
            audit.event("job_interrupted", at=stop.where)
            bound.info("job_interrupted", at=stop.where)
            return JobResult(job_id, subject, "interrupted", job_dir)
        except ConfigError as error:
            # The installation, not the job, is at fault: keep the job resumable and refuse.
            audit.event("job_stopped", code=error.code, message=error.message)
            raise
        except JobError as error:
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, bound)
        except OSError as exc:
            code = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
            error = JobError(code, f"{exc.strerror or exc} ({exc.filename or 'no file name'})", details={"errno": exc.errno})
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, bound)
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job visibly, not kill the daemon
            error = JobError("internal_error", f"{type(exc).__name__}: {exc}", details={"traceback": traceback.format_exc()})
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, bound)

    def _model_facts(self) -> dict[str, Any]:
        remover_path = self.resources.background_model_path()
        return {
            "faces": self.resources.faces().describe(),
            "background": {"path": str(remover_path), "sha256": sha256_file(remover_path)} if remover_path.is_file() else {"path": str(remover_path), "staged": False},
        }

    def _run_stages(self, ctx: StageContext, ledger: Ledger, inputs: dict[str, str], until: str | None) -> None:
        previous = {"inputs": inputs}
        for stage in STAGES:
            ctx.check_stop(f"before {stage.NAME}")
            fingerprint = sha256_bytes(canonical_json({"stage": stage.NAME, "version": stage.VERSION, "config": stage.fingerprint(ctx), "previous": previous}).encode())
            record = ledger.record(stage.NAME)
            if record and record.status == "complete" and record.fingerprint == fingerprint and record.intact(ctx.job_dir):
                ctx.audit.event("stage_skipped", stage=stage.NAME, reason="completed earlier with the same inputs", artifacts=len(record.artifacts))
                ctx.log.info("stage_skipped", stage=stage.NAME)
                for scratch in getattr(stage, "SCRATCH", ()):  # still there after a kill between complete() and its removal
                    _remove(ctx.path(scratch))
            else:
                interrupted = record is not None and record.status == "running" and record.fingerprint == fingerprint
                if record is not None:
                    why = "interrupted" if interrupted else (
                        "inputs or settings changed" if record.fingerprint != fingerprint else "outputs changed on disk")
                    dropped = ledger.drop_from(stage.NAME)
                    ctx.audit.event("stage_invalidated", stage=stage.NAME, reason=why, dropped=dropped)
                    ctx.log.info("stage_invalidated", stage=stage.NAME, reason=why, dropped=dropped)
                # A stage's scratch (training checkpoints) survives only an interruption of the same run.
                for owned in stage.OUTPUTS + (() if interrupted else getattr(stage, "SCRATCH", ())):
                    _remove(ctx.path(owned))
                ledger.start(stage.NAME, fingerprint)
                ctx.audit.event("stage_started", stage=stage.NAME, fingerprint=fingerprint)
                started = dt.datetime.now(dt.timezone.utc)
                ctx.models_used = {}
                ctx.fingerprint = fingerprint
                stage.run(ctx)
                pause_point(f"stage:{stage.NAME}:written")
                artifacts: dict[str, str] = {}
                for owned in stage.OUTPUTS:
                    artifacts.update(hash_tree(ctx.path(owned), ctx.job_dir))
                seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
                # The audit line before the ledger's commit: a kill between the two re-does the
                # stage (its lines then appear twice); the other order lost the line for good,
                # as the next run skips a stage the ledger holds complete.
                ctx.audit.event("stage_finished", stage=stage.NAME, seconds=round(seconds, 3), artifacts=artifacts, models=dict(ctx.models_used))
                ledger.complete(stage.NAME, artifacts, ctx.models_used)
                pause_point(f"stage:{stage.NAME}:complete")
                for scratch in getattr(stage, "SCRATCH", ()):
                    _remove(ctx.path(scratch))
                ctx.log.info("stage_finished", stage=stage.NAME, seconds=round(seconds, 3), artifacts=len(artifacts))
                record = ledger.record(stage.NAME)
            previous = {"fingerprint": record.fingerprint, "artifacts": record.artifacts}
            if stage.NAME == until:
                return

    def _finish(self, ctx: StageContext, ledger: Ledger, inputs: dict[str, str], outbox: Path) -> JobResult:
        """Manifest, last audit line, then one rename into the outbox. A crash before the
        rename leaves a complete job in the work area, which the next run publishes."""
        job = ctx.job
        write_report(ctx.job_dir, originals=zip(job.spec.subject.photos, job.photos))  # before the manifest, which lists it
        manifest_sha256 = write_manifest(ctx.job_dir, ledger.job_id, inputs, ledger.models(), self.demo)
        ctx.audit.event("job_finished", manifest_sha256=manifest_sha256, demo=self.demo)
        final = outbox / job.subject / ledger.job_id
        final.parent.mkdir(parents=True, exist_ok=True)
        pause_point("job:before_publish")
        os.replace(ctx.job_dir, final)
        fsync_dir(final.parent)
        pause_point("job:published")
        ledger.path = final / LEDGER_FILE
        ledger.set_outcome("finished")
        ctx.log.info("job_finished", output=str(final), audit_head=ctx.audit.head)
        return JobResult(ledger.job_id, job.subject, "finished", final)

    def _already_published(self, final: Path, bound: Any) -> JobResult:
        """The job id is already in the outbox: a run killed after the publishing rename, or a
        command run twice. The published job stands as it is: re-doing it would end in a
        rename onto a non-empty folder, i.e. an io_error and a failed/ copy of a job that in
        fact finished. Only its ledger's outcome is settled (a kill between the rename and
        `set_outcome` leaves "running"); the ledger is not in the manifest."""
        ledger_path = final / LEDGER_FILE
        for partial in final.glob(f".{LEDGER_FILE}.*.tmp"):  # the ledger is all a run writes there after the rename
            partial.unlink()
        if ledger_path.is_file():
            ledger = Ledger.open(ledger_path, final.name, final.parent.name, "")
            if ledger.outcome != "finished":
                ledger.set_outcome("finished")
        bound.info("job_already_published", output=str(final))
        return JobResult(final.name, final.parent.name, "finished", final)

    def _fail(self, error: JobError, source: Path, subject: str, job_id: str, job_dir: Path, failed_root: Path,
              audit: AuditLog, ledger: Ledger | None, bound: Any) -> JobResult:
        """Record the failure, copy the untouched inputs with error.json to failed/, drop the work folder.

        Made to work on a full disk (the usual reason for `disk_full`): the partial outputs are
        dropped first, which makes room for the failed/ copy, and an audit line that cannot be
        written is reported in error.json instead of stopping the failure from being published."""
        try:
            audit.event("job_failed", code=error.code, message=error.message, problems=[vars(p) for p in error.problems])
        except OSError as exc:
            error.details["audit_incomplete"] = f"the job_failed audit line could not be written: {exc.strerror or exc}"
        bound.error("job_failed", code=error.code, message=error.message)
        _drop_outputs(job_dir)
        target = failed_root / subject / job_id
        staging = target.with_name(f".{job_id}.incoming")
        _remove(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        left_out = copy_folder_as_dropped(source, staging)
        if left_out:
            error.details["not_copied"] = left_out
        payload = jsonable({"job_id": job_id, "subject": subject, "source": str(source), "failed_at": _now(), **error.to_dict()})
        atomic_write_json(staging / ERROR_FILE, payload)
        if (job_dir / AUDIT_FILE).is_file():
            shutil.copy2(job_dir / AUDIT_FILE, staging / AUDIT_FILE)
        _fsync_tree(staging)
        _remove(target)
        os.replace(staging, target)
        fsync_dir(target.parent)
        if ledger is not None:
            try:
                ledger.set_outcome("failed")
            except OSError:
                pass  # the work folder is removed next: nothing can resume it anyway
        _remove(job_dir)
        return JobResult(job_id, subject, "failed", target, error=payload)


def run_job(source: Path, outbox: Path, settings: Settings | None = None, *, demo: bool = False, **options: Any) -> JobResult:
    """Run one job folder (see `Engine.run_job`); loads models for this one call."""
    return Engine(settings, demo=demo).run_job(source, outbox, **options)


def new_job_id() -> str:
    """Sortable and unique across daemons: UTC time + 24 random bits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def find_unfinished_job(outbox: Path, source: Path) -> str | None:
    """The id of the newest unfinished job that came from `source`, if any."""
    candidates = []
    for ledger_path in (outbox / WORK_DIR).glob(f"*/*/{LEDGER_FILE}"):
        data = Ledger.peek(ledger_path)
        if data and data.get("source") == str(source) and data.get("outcome") == "running":
            candidates.append(data["job_id"])
    return max(candidates) if candidates else None


def input_hashes(job: LoadedJob) -> dict[str, str]:
    hashes = {JOB_FILE: sha256_file(job.folder / JOB_FILE)}
    for name, path in zip(job.spec.subject.photos, job.photos):
        hashes[name] = sha256_file(path)
    return dict(sorted(hashes.items()))


def _folder_hashes(folder: Path, limit: int = 64) -> dict[str, str]:
    """Hashes of the visible regular files of a folder that could not be read as a job."""
    hashes: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir())[:limit]:
            if path.is_file() and not path.is_symlink() and not is_hidden_name(path.name):
                hashes[path.name] = sha256_file(path)
    return hashes


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        facts["cuda"] = bool(torch.cuda.is_available())
        if facts["cuda"]:
            facts["gpu"] = torch.cuda.get_device_name(0)
        facts["torch_threads"] = torch.get_num_threads()
    except ImportError:
        facts["cuda"] = False
    return facts


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _drop_outputs(job_dir: Path) -> None:
    """Remove a failed job's partial outputs, keeping its audit log and ledger."""
    if job_dir.is_dir():
        for path in job_dir.iterdir():
            if path.name not in (AUDIT_FILE, LEDGER_FILE):
                _remove(path)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in sorted({p.parent for p in root.rglob("*")} | {root}):
        fsync_dir(folder)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
