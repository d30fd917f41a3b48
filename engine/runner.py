"""The sequential engine: one job folder in, one verifiable result folder out.

Lifecycle on disk (each a folder you can look at; the names are engine.jobfolder's):
    <outbox>/.work/<job-id>/             while running: inputs/ (the dropped folder, copied and
                                         verified first: every stage, and the report, read only
                                         this copy), ledger state.json, audit.jsonl, outputs
    <outbox>/<subject>/<job-id>/         finished: renamed here in one step, manifest written
    <failed>/<subject>/<job-id>/         refused or failed: inputs/ + error.json + audit.jsonl
The source folder is only read, and only until its copy is verified. A crash at any point costs
at most the stage in flight: running the same folder again finds the unfinished job by its
source path and resumes from the ledger.

When the disk, the share or a permission is at fault (a full or read-only outbox or failed/,
a share that went away), the job is not to blame: it is *held* (outcome "held", code disk_full /
outbox_unwritable / io_error naming the path), stays resumable in the work area, and nothing is
lost; run it again (the daemon retries it) once the fault is fixed.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from engine.diffusion import compiling
from engine.provenance.audit import AuditLog, Observer, jsonable, read_chain, set_aside_damaged, write_manifest
from engine.config import Settings
from engine.context import StageContext
from engine.errors import ConfigError, JobError, JobInterrupted, OwnershipLost
from engine.faults import pause_point
from engine.fsutil import (Listing, canonical_json, fsync_dir, guarded_writes, hash_tree, remove_partial_writes, remove_tree, sha256_bytes, share_modes,
                           sha256_file, tree_listing, utf8_safe)
from engine.hashcache import sha256_of
from engine.job import JOB_FILE, LoadedJob, load_job, safe_subject_name
from engine.jobfolder import (AUDIT_FILE, DAMAGED_AUDIT_PREFIX, ERROR_FILE, INPUTS_DIR, LEDGER_FILE, MANIFEST_FILE, SIGNATURE_FILE,  # noqa: F401
                              WITNESS_FILE, WORK_DIR, Fence, NoFence,
                              check_dropped_folder, classify_os_error, copy_verified, describe_os_error, failure_record, failure_staging,
                              find_published,
                              kept_inputs, new_job_id, probe_job_targets, publish_failure, remove_leftover_work, work_dir)
from engine.ledger import Ledger
from engine.lifecycle import JobOutcome, LedgerOutcome, StageStatus
from engine.plugins import kind_code, load_plugins
from engine.report import write_report
from engine.resources import DIFFUSION_ROLES, Resources
from engine.schema import to_plain
from engine.kinds import Kind, all_stage_names, kind_named
from engine.stages import declared_models, stage_module
from engine.provenance.signer import SealRefused
from engine.provenance.trust import build_statement
from engine.provenance.verification import trusted_records
from engine.version import engine_version

VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "insightface", "onnxruntime", "rembg", "numpy", "pillow", "opencv-python-headless", "scipy")

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class JobResult:
    job_id: str
    subject: str
    # "finished" | "partial" (stopped by --until) | "interrupted" (stop requested) | "failed" |
    # "held" (the disk, share or permissions are at fault: resumable, nothing lost) |
    # "lost" (another owner took the job over: this process wrote nothing more)
    outcome: str
    output_dir: Path
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome not in (JobOutcome.FAILED, JobOutcome.HELD)


class Engine:
    """Runs jobs one after another, keeping models loaded between them."""

    def __init__(self, settings: Settings | None = None, *, demo: bool = False, observer: Observer | None = None,
                 until: str | None = None) -> None:
        """`until`: the last stage this engine will be asked to run (None: all of them); only
        the models of those stages are checked (`--until embed` needs no diffusion weights)."""
        self.settings = settings or Settings.load(None)
        # The tiny demo model is used only when asked for: --demo, or models.base = "demo".
        self.demo = demo or self.settings.models.base == "demo"
        self.observer = observer
        self.until = until
        self._origin: str | None = None  # the job in hand's folder as dropped (run_job's `origin`)
        self.resources = Resources(self.settings, demo=self.demo)
        # Set from another thread (a signal handler) to stop the job in flight at its next
        # safe point; the job stays in the work area and resumes on the next run.
        self.stop_requested = threading.Event()
        load_plugins(self.settings)  # the lab's kinds, also where no CLI read config.toml (a Ray worker, a library user)
        self.check_installation()

    def check_installation(self) -> None:
        """Refuse to start (ConfigError naming what to stage where) rather than fail jobs later.

        Every model the stages up to `until` need must be staged (engine.inventory: one
        ConfigError("model_missing") names them all); the realism model is checked when a job
        asks for two_pass; lab keys named by [trust] keys must be there. Logs `engine_ready`:
        device, dtype, the face pack in use and the onnxruntime providers its sessions got (and
        engine.identity.faces a `face_pack_fallback` warning when the pack asked for is not staged)."""
        from engine.inventory import require_models
        from engine.diffusion.models import select_device_dtype

        require_models(self.settings, demo=self.demo, until=self.until)
        self.resources.sealer()  # with [trust] keys: the signer process starts now, before this process decodes anything
        faces = self.resources.faces()
        compiling.check(self.settings)
        self._apply_cpu_threads()
        device, dtype = select_device_dtype(self.settings)
        log.info("engine_ready", device=str(device), dtype=str(dtype).removeprefix("torch."), face_pack=faces.files.pack,
                 face_pack_requested=faces.files.requested, face_providers=faces.session_providers, demo=self.demo,
                 until=self.until, version=engine_version())

    @staticmethod
    def check_folders(outbox: Path, failed: Path) -> None:
        """Refuse to start (ConfigError naming the path and the fault) when the outbox, its work
        area or failed/ cannot be written, or the work area is not on the outbox's file system."""
        problems = probe_job_targets(Path(outbox), Path(failed))
        if problems:
            raise ConfigError("folder_unusable", "; ".join(problems))

    def _apply_cpu_threads(self) -> None:
        """torch's intra-op thread count on the CPU (`models.cpu_threads`), in the calling
        thread: OpenMP keeps it per thread, and a thread torch has not seen yet (the daemon runs
        each job in a new worker thread) starts with every core. A checkpoint resumes
        bit-exactly only under the thread count it was written with (FINDINGS)."""
        from engine.diffusion.models import select_device_dtype

        device, _ = select_device_dtype(self.settings)
        if device.type == "cpu" and self.settings.models.cpu_threads:
            import torch

            torch.set_num_threads(self.settings.models.cpu_threads)

    def run_job(self, source: Path, outbox: Path, *, job_id: str | None = None, until: str | None = None,
                failed_dir: Path | None = None, fence: Fence | None = None, refresh_inputs: bool = True,
                origin: Path | str | None = None) -> JobResult:
        """Run (or resume) the job in folder `source`; results go under `outbox`.

        until      the last stage to run (one of the job's kind's stages); the job then stays in the work area.
        job_id     resume or create this job; by default the unfinished job of the same source
                   folder is resumed, or a new id is made. An id already published (in the outbox
                   or in failed/: a run killed after its publishing rename) is returned as it is.
        failed_dir where refused/failed jobs go; by default `failed/` beside the outbox.
        fence      the job's owner (the daemon's claim): every write the job makes (audit line,
                   ledger, output, publishing) first asks it, and stops with outcome "lost" when
                   this process no longer owns the job; its token goes into every audit line.
        refresh_inputs  on a resume, copy the source again when it differs from the job's inputs/
                   (a person changed a photo and runs the folder again). The daemon says False:
                   once its copy is verified, the claimed folder is never read again.
        origin     where the folder was dropped, when `source` is not that place any more (the
                   daemon's claim moved it into its work area): the audit log and error.json name
                   this, the path a person knows and looks for.
        """
        source, outbox = Path(source).resolve(), Path(outbox).resolve()
        self._origin = utf8_safe(str(origin)) if origin is not None else None
        self._apply_cpu_threads()
        failed_root = Path(failed_dir).resolve() if failed_dir else outbox.parent / "failed"
        if until is not None and until not in all_stage_names():
            raise ValueError(f"unknown stage {until!r}; stages are {', '.join(all_stage_names())}")
        if self.until is not None and until != self.until:
            from engine.inventory import require_models

            require_models(self.settings, demo=self.demo, until=until)  # models this engine may not have checked at start
        fence = fence or NoFence()
        job_id = job_id or find_unfinished_job(outbox, source) or new_job_id()
        with guarded_writes(fence.check):
            try:
                return self._run(source, outbox, failed_root, job_id, until, fence, refresh_inputs)
            except OwnershipLost as lost:
                log.warning("job_ownership_lost", job_id=job_id, at=lost.where)
                return JobResult(job_id, safe_subject_name(source.name), JobOutcome.LOST, work_dir(outbox, job_id))

    def _run(self, source: Path, outbox: Path, failed_root: Path, job_id: str, until: str | None, fence: Fence,
             refresh_inputs: bool) -> JobResult:
        bound = log.bind(job_id=job_id)
        job_dir = work_dir(outbox, job_id)
        subject = safe_subject_name(source.name)  # until job.toml has been read
        try:
            published = find_published(outbox, failed_root, job_id)
        except OSError as exc:  # the outbox or failed/ cannot even be listed: a share that went away
            return self._held(self._installation_fault(exc, source, outbox, failed_root) or "io_error", exc, subject, job_id, job_dir, None, bound)
        if published is not None:
            return self._already_published(outbox, job_id, *published, bound)
        # A job with no work folder was never sealed: the look into failed/ is for a re-run only.
        sealed_failure = self._sealed_failure(outbox, failed_root, job_id, fence, bound) if job_dir.is_dir() else None
        if sealed_failure is not None:
            return sealed_failure
        sealed_subject = sealed_in_place(job_dir, where="outbox", job_id=job_id, outbox=outbox)
        if sealed_subject is not None:
            # Sealed before a kill or a fault stopped its publishing rename: publish it as it was
            # sealed (a job id is sealed once; nothing may be appended to it now).
            try:
                partial = remove_partial_writes(job_dir)  # a kill inside signature.json's atomic write leaves its temporary file
                bound.info("job_sealed_earlier", note="publishing the job as it was sealed", partial_writes_removed=partial)
                return self._seal_and_publish(job_dir, outbox, sealed_subject, job_id, fence, bound)
            except OSError as exc:
                return self._held(self._installation_fault(exc, source, outbox, failed_root) or "io_error", exc, sealed_subject, job_id, job_dir,
                                  None, bound)
        audit: AuditLog | None = None
        ledger: Ledger | None = None
        job: LoadedJob | None = None
        try:
            resumed = (job_dir / AUDIT_FILE).exists()
            ledger, audit = self._open_ledger(job_dir, job_id, source, fence)
            if resumed:
                # A killed run leaves the temporary files of the atomic writes it was in the
                # middle of (state.json's, a report image's...): they must not be published.
                partial = remove_partial_writes(job_dir)
                if partial:
                    audit.event("partial_writes_removed", files=partial)
            try:
                copied = self._inputs(source, job_dir, ledger, audit, refresh_inputs)
            except JobError as error:  # a tree no job folder is: refused before it is copied
                audit.event("job_started", **self._source_facts(source), subject=subject, inputs={}, versions=software_versions(), demo=self.demo)
                return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, fence, bound)
            start = dict(**self._source_facts(source), inputs=copied.entries, not_copied=copied.left_out, versions=software_versions(), demo=self.demo,
                         trust=self.resources.trust_facts(), compile=compiling.facts(self.settings))
            try:
                job = load_job(job_dir / INPUTS_DIR, self.settings.job_defaults, self.settings.input.extensions, self.settings.render.denylist,
                               folder_name=source.name)
            except JobError as error:
                audit.event("job_resumed" if resumed else "job_started", subject=subject, **start)
                refused = JobError("invalid_job", f"{JOB_FILE} is not a regular file (a named pipe, socket or device)") if JOB_FILE in copied.left_out else error
                return self._fail(refused, source, subject, job_id, job_dir, failed_root, audit, ledger, fence, bound)
            subject = job.subject
            kind = kind_named(job.kind)
            if (ledger.subject, ledger.kind) != (subject, kind.name):
                ledger.subject, ledger.kind = subject, kind.name
                ledger.save()
            bound = bound.bind(subject=subject)
            ctx = StageContext(job=job, job_id=job_id, job_dir=job_dir, settings=self.settings, resources=self.resources, audit=audit, demo=self.demo,
                               log=bound, observer=self.observer, stop_requested=self.stop_requested, fence=fence)
            used = input_hashes(job)
            code = kind_code(kind)  # a plug-in kind's own modules (none for a built-in kind)
            audit.event(
                "job_resumed" if resumed else "job_started", subject=subject, kind=kind.name, **start, spec=to_plain(job.spec), settings=self.settings.to_plain(),
                models=self._model_facts(), families=self._families({role for name in kind.stages for role in declared_models(name)}),
                device=device_facts(), completed_stages=[r.name for r in ledger.stages if r.status == StageStatus.COMPLETE],
                **({"kind_code": code} if code else {}),
            )
            bound.info("job_resumed" if resumed else "job_started", **self._source_facts(source))
            if until is not None and until not in kind.stages:
                raise ConfigError("unknown_stage", f"--until {until}: a {kind.name} job has no such stage; its stages are {', '.join(kind.stages)}")
            self._run_stages(ctx, kind, ledger, used, until)
            if until is not None and until != kind.stages[-1]:
                audit.event("job_paused", until=until)
                return JobResult(job_id, subject, JobOutcome.PARTIAL, job_dir)
            return self._finish(ctx, ledger, outbox)
        except OwnershipLost:
            raise  # nothing more may be written, not even that we stopped
        except JobInterrupted as stop:
            assert audit is not None
            audit.event("job_interrupted", at=stop.where)
            bound.info("job_interrupted", at=stop.where)
            return JobResult(job_id, subject, JobOutcome.INTERRUPTED, job_dir)
        except ConfigError as error:
            # The installation, not the job, is at fault: keep the job resumable and refuse.
            if audit is not None:
                audit.event("job_stopped", code=error.code, message=error.message)
            raise
        except JobError as error:
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, fence, bound)
        except OSError as exc:
            code = self._installation_fault(exc, source, outbox, failed_root)
            if code is not None:
                return self._held(code, exc, subject, job_id, job_dir, audit, bound)
            error = JobError("internal_error", f"{type(exc).__name__}: {describe_os_error(exc)}", details={"errno": exc.errno, "traceback": traceback.format_exc()})
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, fence, bound)
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job visibly, not kill the daemon
            error = JobError("internal_error", f"{type(exc).__name__}: {exc}", details={"traceback": traceback.format_exc()})
            return self._fail(error, source, subject, job_id, job_dir, failed_root, audit, ledger, fence, bound)

    def _open_ledger(self, job_dir: Path, job_id: str, source: Path, fence: Fence) -> tuple[Ledger, AuditLog]:
        """The job's ledger, as its audit chain says it (engine.ledger: state.json is a cache of
        the chain, and bytes on the share are input), and its audit log, opened for appending.

        state.json torn, padded, of another version, or not what the chain says: the rebuilt
        ledger is used and saved, and `ledger_rebuilt` says why (reason "torn" | "missing" |
        "differs", and what differed). A chain broken before its end (a line edited, removed,
        inserted, or one of another job; not a torn last line, which AuditLog cuts off) cannot
        vouch for the work so far: it is set aside as audit.jsonl.damaged-<UTC time>, a fresh
        chain begins with `audit_damaged` (its sha256, size, first broken line), and every stage
        is done again from the inputs/ copy (checked against the last listing that verified)."""
        audit_path, ledger_path = job_dir / AUDIT_FILE, job_dir / LEDGER_FILE
        chain = read_chain(audit_path)
        foreign = next((number for number, record in enumerate(chain.records, start=1) if record.get("job_id") != job_id), None)
        if foreign is not None:
            chain.broken_at, chain.problem, chain.records = foreign, f"a line of another job ({chain.records[foreign - 1].get('job_id')!r})", chain.records[:foreign - 1]
        damaged = set_aside_damaged(audit_path, chain) if chain.broken_at is not None else None
        # With lab keys, only what the signer witnessed: a chain re-hashed on the share carries no witness.
        public_key = self.resources.lab_public_key()
        trusted, unwitnessed = trusted_records(chain.records, job_dir / WITNESS_FILE, job_id, public_key) if damaged is None else ([], None)
        ledger = Ledger.from_audit(ledger_path, job_id, utf8_safe(str(source)), trusted)
        if damaged is not None:
            ledger.stages = []
        cached, unreadable = Ledger.read(ledger_path)
        if cached is None and unreadable == "missing":
            ledger.save()  # first of all: a job the next run can find by its source, whatever happens next
        outbox = job_dir.parent.parent
        sealer = self.resources.sealer()
        witness = (lambda head, lines: sealer.witness(job_id, outbox, head, lines)) if public_key is not None else None
        audit = AuditLog(audit_path, job_id, self.observer, fence=fence.token, witness=witness)
        if damaged is not None:
            audit.event("audit_damaged", source=ledger.source, **damaged)
        if unwitnessed is not None:
            audit.event("unwitnessed_lines", from_line=unwitnessed[0], to_line=unwitnessed[1],
                        reason="written after the last line the signer witnessed (a kill before its witness, or lines added on the share): "
                               "kept in the chain, not trusted by this or any later resume")
        if cached is None and unreadable != "missing":
            audit.event("ledger_rebuilt", reason="torn", detail=unreadable)
            ledger.save()
        elif cached is None and chain.records:  # saved above
            audit.event("ledger_rebuilt", reason="missing", detail=unreadable)
        elif cached is not None and (differences := ledger.differences(cached)):
            audit.event("ledger_rebuilt", reason="differs", **differences)
            ledger.save()
        return ledger, audit

    def _source_facts(self, source: Path) -> dict[str, str]:
        """`source`: the folder as dropped; `read_from`: where this run read it, when elsewhere."""
        if self._origin is None or self._origin == utf8_safe(str(source)):
            return {"source": utf8_safe(str(source))}
        return {"source": self._origin, "read_from": utf8_safe(str(source))}

    def _inputs(self, source: Path, job_dir: Path, ledger: Ledger, audit: AuditLog, refresh: bool) -> Listing:
        """The job's own copy of the dropped folder, `inputs/`: made (and verified) once, before
        anything reads the job; on a resume checked against the ledger, and copied again only when
        it was damaged, or when `refresh` and the source changed."""
        inputs = job_dir / INPUTS_DIR
        if inputs.is_dir() and ledger.inputs:
            kept = Listing(tree_listing(inputs).entries, ledger.not_copied)
            if kept.entries == ledger.inputs:
                if not refresh:
                    return kept
                now = tree_listing(source)
                if now.entries == kept.entries:
                    return kept
                audit.event("inputs_changed", **Listing(ledger.inputs).differences(now))
            else:
                audit.event("inputs_damaged", **Listing(ledger.inputs).differences(kept))
        check_dropped_folder(source)
        copied = copy_verified(source, inputs)
        ledger.inputs, ledger.not_copied = copied.entries, copied.left_out
        ledger.save()
        pause_point("job:inputs_copied")
        return copied

    def _installation_fault(self, exc: OSError, source: Path, outbox: Path, failed_root: Path) -> str | None:
        """disk_full / outbox_unwritable / io_error when the disk, the share or a permission is to
        blame for `exc`, not the job; None when the job (or a bug) is."""
        code = classify_os_error(exc)
        if code is not None:
            return code
        if exc.filename is not None and str(exc.filename).startswith(str(source)):
            return "io_error"  # the job folder itself cannot be read any more (a share that went away)
        if probe_job_targets(outbox, failed_root):
            return "io_error"  # an error of any kind, and the folders fail their probe: the installation
        return None

    def _held(self, code: str, exc: OSError, subject: str, job_id: str, job_dir: Path, audit: AuditLog | None, bound: Any,
              pending: dict[str, Any] | None = None) -> JobResult:
        """The installation is at fault: the job stays as it is (resumable), nothing is lost."""
        what = "the failure of this job could not be published" if pending else "the job cannot go on"
        message = (f"{what}: {describe_os_error(exc)}; the job is held, nothing was lost (the job folder is untouched, the work so "
                   "far is kept), and it resumes when run again once the disk, share or permission is fixed")
        error = {"code": code, "message": message, "problems": [], "details": {"errno": exc.errno, "path": utf8_safe(str(exc.filename or ""))}}
        if pending:
            error["details"]["pending_failure"] = pending
        if audit is not None:
            try:
                audit.event("job_held", code=code, message=message, errno=exc.errno, path=exc.filename)
            except OSError:
                pass  # the same fault, most likely: the result says it all
        bound.error("job_held", code=code, message=message)
        if not (job_dir / LEDGER_FILE).exists():
            try:  # not even its ledger could be written: nothing there to resume from, or to find it by
                remove_tree(job_dir)
            except OSError:
                pass
        return JobResult(job_id, subject, JobOutcome.HELD, job_dir, error=error)

    def _model_facts(self) -> dict[str, Any]:
        remover_path = self.resources.background_model_path()
        return {
            "faces": self.resources.faces().describe(),
            "background": {"path": str(remover_path), "sha256": sha256_of(remover_path, self.settings.models_dir)} if remover_path.is_file() else {"path": str(remover_path), "staged": False},
        }

    def _families(self, roles: set[str]) -> dict[str, str]:
        """role -> family of each diffusion model among `roles` that is staged (a model not staged is
        named by the stage that needs it, not here), so that every record says which family made it."""
        families = {}
        for role in DIFFUSION_ROLES:
            if role in roles:
                try:
                    families[role] = self.resources.family(role)
                except (ConfigError, JobError, OSError):
                    continue
        return families

    def _run_stages(self, ctx: StageContext, kind: Kind, ledger: Ledger, inputs: dict[str, str], until: str | None) -> None:
        """Run `kind`'s stages in order, skipping those the ledger holds complete with the same
        fingerprint. `inputs`: the hashes of the files the job uses (job.toml and its photos):
        a note beside them can change without re-doing anything."""
        foreign = [record.name for record in ledger.stages if record.name not in kind.stages]
        if foreign:  # job.toml's kind changed since the last run: what the other kind made goes
            for name in foreign:
                for owned in stage_module(name).OUTPUTS + getattr(stage_module(name), "SCRATCH", ()):
                    remove_tree(ctx.path(owned))
            ledger.stages = [record for record in ledger.stages if record.name in kind.stages]
            ledger.save()
            ctx.audit.event("stages_dropped", stages=foreign, reason=f"not stages of this job's kind {kind.name!r}")
        previous = {"inputs": inputs}
        for stage in map(stage_module, kind.stages):
            ctx.check_stop(f"before {stage.NAME}")
            roles = tuple(stage.models(ctx))
            if not set(roles) <= set(stage.MODELS):  # the inventory checked MODELS at start-up, nothing beyond it
                raise RuntimeError(f"stage {stage.NAME} uses model role(s) {', '.join(sorted(set(roles) - set(stage.MODELS)))} missing from its MODELS")
            models = {role: self.resources.hashes(role) for role in roles}  # the one place a stage's models enter its fingerprint
            fingerprint = sha256_bytes(canonical_json({"stage": stage.NAME, "version": stage.VERSION, "config": stage.fingerprint(ctx), "models": models,
                                                       "previous": previous}).encode())
            record = ledger.record(stage.NAME)
            if record and record.status == StageStatus.COMPLETE and record.fingerprint == fingerprint and record.intact(ctx.job_dir):
                ctx.audit.event("stage_skipped", stage=stage.NAME, reason="completed earlier with the same inputs", artifacts=len(record.artifacts))
                ctx.log.info("stage_skipped", stage=stage.NAME)
                for scratch in getattr(stage, "SCRATCH", ()):  # still there after a kill between complete() and its removal
                    remove_tree(ctx.path(scratch))
            else:
                interrupted = record is not None and record.status == StageStatus.RUNNING and record.fingerprint == fingerprint
                if record is not None:
                    why = "interrupted" if interrupted else (
                        "inputs or settings changed" if record.fingerprint != fingerprint else "outputs changed on disk")
                    dropped = ledger.drop_from(stage.NAME)
                    ctx.audit.event("stage_invalidated", stage=stage.NAME, reason=why, dropped=dropped)
                    ctx.log.info("stage_invalidated", stage=stage.NAME, reason=why, dropped=dropped)
                # A stage's scratch (training checkpoints) survives only an interruption of the same run.
                for owned in stage.OUTPUTS + (() if interrupted else getattr(stage, "SCRATCH", ())):
                    remove_tree(ctx.path(owned))
                ledger.start(stage.NAME, fingerprint)
                # continues: this run goes on with the interrupted one (its scratch kept); what that
                # one recorded of its scratch is trusted too (engine.provenance.audit.stage_run_records).
                ctx.audit.event("stage_started", stage=stage.NAME, fingerprint=fingerprint, continues=interrupted)
                started = dt.datetime.now(dt.timezone.utc)
                ctx.models_used, ctx.models_declared = {}, roles
                ctx.fingerprint = fingerprint
                compiled_before = compiling.counters()
                stage.run(ctx)
                pause_point(f"stage:{stage.NAME}:written")
                artifacts: dict[str, str] = {}
                for owned in stage.OUTPUTS:
                    artifacts.update(hash_tree(ctx.path(owned), ctx.job_dir))
                seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
                # The audit line before the ledger's commit: a kill between the two re-does the
                # stage (its lines then appear twice); the other order lost the line for good,
                # as the next run skips a stage the ledger holds complete.
                # With models.compile: the graphs this stage compiled, and inductor cache hits/misses (engine.diffusion.compiling).
                compiled = {"compiled": compiling.since(compiled_before)} if compiling.enabled(self.settings) else {}
                ctx.audit.event("stage_finished", stage=stage.NAME, seconds=round(seconds, 3), artifacts=artifacts, models=dict(ctx.models_used), **compiled)
                ledger.complete(stage.NAME, artifacts, ctx.models_used)
                pause_point(f"stage:{stage.NAME}:complete")
                for scratch in getattr(stage, "SCRATCH", ()):
                    remove_tree(ctx.path(scratch))
                ctx.log.info("stage_finished", stage=stage.NAME, seconds=round(seconds, 3), artifacts=len(artifacts))
                record = ledger.record(stage.NAME)
            previous = {"fingerprint": record.fingerprint, "artifacts": record.artifacts}
            if stage.NAME == until:
                return

    def _finish(self, ctx: StageContext, ledger: Ledger, outbox: Path) -> JobResult:
        """Report, manifest, last audit line; then the signed head and the journal line (the
        signer: `_seal_and_publish`) and one rename into the outbox. A crash before the rename
        leaves a complete job in the work area, which the next run seals (if it was not) and publishes."""
        job = ctx.job
        write_report(ctx.job_dir, originals=zip(job.spec.subject.photos, job.photos))  # before the manifest, which lists it
        used = {name.split("/", 1)[0] for name in ledger.models()}  # the roles the completed stages used ("inpaint/unet/...")
        manifest_sha256 = write_manifest(ctx.job_dir, ledger.job_id, ledger.inputs, ledger.models(), self.demo, self.resources.trust_facts(),
                                         kind=ctx.job.kind, families=self._families(used))
        ctx.audit.event("job_finished", manifest_sha256=manifest_sha256, demo=self.demo)
        pause_point("job:before_seal")
        return self._seal_and_publish(ctx.job_dir, outbox, job.subject, ledger.job_id, ctx.fence, ctx.log)

    def _seal_and_publish(self, job_dir: Path, outbox: Path, subject: str, job_id: str, fence: Fence, bound: Any) -> JobResult:
        """The signer seals the finished job (signature.json over its audit log and manifest, and
        the outbox's journal line: the last things written into it), then one rename publishes it.
        From that rename on the job is published: whatever fails after it is a publication problem
        (held, retried), never a job failure (a published job is never also put in failed/)."""
        share_modes(job_dir)  # reviewers on the share read it: the umask's modes, whatever wrote each file
        fence.check("seal the job")
        try:
            self.resources.sealer().seal(job_dir, outbox=outbox, where="outbox", path=f"{subject}/{job_id}", job_id=job_id, subject=subject)
        except SealRefused as refused:
            return self._seal_refused(refused, subject, job_id, job_dir, bound)
        final = outbox / subject / job_id
        final.parent.mkdir(parents=True, exist_ok=True)
        pause_point("job:before_publish")
        fence.check("publish to the outbox")
        os.rename(job_dir, final)  # onto an existing, non-empty folder this fails: a published job is never replaced
        try:
            fsync_dir(final.parent)
            pause_point("job:published")
            _mark_finished(final, job_id)
        except Exception as exc:  # noqa: BLE001 - published: what is left is settled by the next run of the job id
            return self._publication_incomplete(exc, JobOutcome.FINISHED, subject, job_id, final, bound)
        bound.info("job_finished", output=str(final))
        return JobResult(job_id, subject, JobOutcome.FINISHED, final)

    def _sealed_failure(self, outbox: Path, failed_root: Path, job_id: str, fence: Fence, bound: Any) -> JobResult | None:
        """A failure the signer sealed in failed/'s staging folder before a kill stopped its
        rename: it is the job's record (a job id is sealed once), so it is published as it is,
        whatever a new run of the job would do. None when there is none."""
        import json

        try:
            stagings = [failure_staging(failed_root, subject.name, job_id) for subject in failed_root.iterdir()]
            stagings = [staging for staging in stagings if staging.is_dir()]
        except OSError:
            return None
        for staging in stagings:
            subject = sealed_in_place(staging, where="failed", job_id=job_id, outbox=outbox)
            if subject != staging.parent.name:
                continue
            target = staging.with_name(job_id)
            fence.check("publish to failed/")
            try:
                os.rename(staging, target)
                fsync_dir(target.parent)
                record = json.loads((target / ERROR_FILE).read_text("utf-8"))
                remove_leftover_work(outbox, job_id)
            except (OSError, ValueError) as exc:
                return self._publication_incomplete(exc, JobOutcome.FAILED, subject, job_id, target, bound)
            bound.info("failure_sealed_earlier_published", failed=str(target))
            return JobResult(job_id, subject, JobOutcome.FAILED, target, error=record)
        return None

    def _publication_incomplete(self, exc: BaseException, outcome: str, subject: str, job_id: str, folder: Path, bound: Any) -> JobResult:
        """Held after the publishing rename: the job stands published; a later run of its id settles the rest."""
        code = classify_os_error(exc) if isinstance(exc, OSError) else None
        message = (f"the job is published in {folder}, but settling it afterwards failed: {type(exc).__name__}: {exc}; it is not run "
                   "again: the next run of this job id (the daemon retries it) settles what is left")
        bound.error("publication_incomplete", message=message, outcome=outcome)
        return JobResult(job_id, subject, JobOutcome.HELD, folder,
                         error={"code": code or "publication_incomplete", "message": message, "problems": [],
                                "details": {"published_as": outcome, "traceback": traceback.format_exc()}})

    def _seal_refused(self, refused: SealRefused, subject: str, job_id: str, job_dir: Path, bound: Any) -> JobResult:
        """The signer will not seal: the job id was sealed before with another head (a tampered
        work area, or the id published already). Held for a person to look: nothing is published twice."""
        message = (f"the signer refused to seal job {job_id}: {refused.message}. Nothing was published; the work folder {job_dir} is kept "
                   "as it is for a person to look at (verify-journal shows what was sealed)")
        bound.error("seal_refused", code=refused.code, message=message)
        return JobResult(job_id, subject, JobOutcome.HELD, job_dir, error={"code": refused.code, "message": message, "problems": [],
                                                                           "details": {}})

    def _already_published(self, outbox: Path, job_id: str, outcome: str, folder: Path, bound: Any) -> JobResult:
        """The job id is already published: a run killed after the publishing rename, or a
        command run twice. The published job stands as it is (re-doing it would end in a rename
        onto a non-empty folder). Only what a kill can leave behind is settled: a finished job's
        ledger outcome (a kill between the rename and `set_outcome` leaves "running"; the
        ledger is not in the manifest), and a failed job's work folder (a kill between the
        rename into failed/ and its removal). Its journal line was written when it was sealed,
        before the rename. Anything that fails here is a publication problem: held, never re-run."""
        error = None
        try:
            if outcome == JobOutcome.FINISHED:
                _mark_finished(folder, job_id)
            else:
                import json

                error = json.loads((folder / ERROR_FILE).read_text("utf-8"))
                if not isinstance(error, dict):
                    raise ValueError(f"{folder / ERROR_FILE} holds no JSON object")
            if remove_leftover_work(outbox, job_id):
                bound.info("leftover_work_folder_removed", job_id=job_id)
        except Exception as exc:  # noqa: BLE001 - published: never re-run, never failed a second time
            return self._publication_incomplete(exc, outcome, folder.parent.name, job_id, folder, bound)
        bound.info("job_already_published", output=str(folder), outcome=outcome)
        return JobResult(job_id, folder.parent.name, outcome, folder, error=error)

    def _fail(self, error: JobError, source: Path, subject: str, job_id: str, job_dir: Path, failed_root: Path,
              audit: AuditLog | None, ledger: Ledger | None, fence: Fence, bound: Any) -> JobResult:
        """Record the failure and publish it to failed/ (engine.jobfolder.publish_failure: copy of
        the inputs -> verify -> one rename, with error.json and the audit log), then drop the work
        folder. When failed/ cannot be written the job is held instead: nothing is removed.

        Made to work on a full disk (the usual reason a publication fails): the partial outputs
        are dropped first, which makes room for the failed/ copy, and an audit line that cannot
        be written is reported in error.json instead of stopping the failure from being published."""
        if audit is not None:
            try:
                audit.event("job_failed", code=error.code, message=error.message, problems=[vars(p) for p in error.problems])
            except OSError as exc:
                error.details["audit_incomplete"] = f"the job_failed audit line could not be written: {exc.strerror or exc}"
        bound.error("job_failed", code=error.code, message=error.message)
        try:
            _drop_outputs(job_dir)
        except OSError:
            pass  # a read-only work area: the publication below says what is wrong
        inputs = job_dir / INPUTS_DIR if ledger is not None and ledger.inputs and (job_dir / INPUTS_DIR).is_dir() else source
        if inputs != source and ledger is not None and ledger.not_copied:
            error.details["not_copied"] = ledger.not_copied  # left out when the inputs were copied
        record = jsonable(failure_record(job_id, subject, self._origin or source, error))
        try:
            target, record = self._publish_failure(inputs, outbox_of(job_dir), failed_root, subject, job_id, record, job_dir / AUDIT_FILE,
                                                   fence.check)
        except SealRefused as refused:
            return self._seal_refused(refused, subject, job_id, job_dir, bound)
        except OSError as exc:
            return self._held(classify_os_error(exc) or "io_error", exc, subject, job_id, job_dir, audit, bound, pending=record)
        pause_point("job:failed_published")
        try:
            remove_tree(job_dir)
        except OSError as exc:  # published all the same; the next run of this id removes the leftover
            bound.warning("work_folder_not_removed", job_id=job_id, error=str(exc))
        return JobResult(job_id, subject, JobOutcome.FAILED, target, error=record)

    def _publish_failure(self, inputs: Path, outbox: Path, failed_root: Path, subject: str, job_id: str, record: dict[str, Any],
                         audit: Path | None, check: Any, only: frozenset[str] | None = None) -> tuple[Path, dict[str, Any]]:
        """engine.jobfolder.publish_failure, sealed by the signer (the signed head over its manifest,
        error.json and audit log, and the outbox's journal line). Returns (folder, record)."""
        where = f"{subject}/{job_id}"

        def seal(staging: Path) -> None:
            self.resources.sealer().seal(staging, outbox=outbox, where="failed", path=where, job_id=job_id, subject=subject)

        def sealed(staging: Path) -> bool:
            return sealed_in_place(staging, where="failed", job_id=job_id, outbox=outbox) == subject

        return publish_failure(inputs_from=inputs, failed_root=failed_root, subject=subject, job_id=job_id, record=record,
                               audit=audit, check=check, only=only, seal=seal, sealed=sealed)

    def publish_refusal(self, error: JobError, source: Path, outbox: Path, failed_dir: Path, *, job_id: str | None = None,
                        subject: str | None = None, only: frozenset[str] | None = None, fence: Fence | None = None,
                        origin: Path | str | None = None) -> JobResult:
        """Publish to failed/ a job the daemon does not run: given up (too_many_crashes: `job_id`,
        from the engine's verified copy of its inputs when there is one, with its audit log), or a
        folder it refuses (a mount point, files written into a claimed folder: a new job id, just
        the paths `only`). Signed and journaled like every failure, through the one publisher.
        OSError when failed/ cannot be written: nothing was published, the caller keeps the input.
        Held when the signer refuses (the job id was sealed already: it is never published twice)."""
        fence = fence or NoFence()
        outbox, failed_root, source = Path(outbox).resolve(), Path(failed_dir).resolve(), Path(source)
        self._origin = utf8_safe(str(origin)) if origin is not None else None
        job_id = job_id or new_job_id()
        bound = log.bind(job_id=job_id)
        with guarded_writes(fence.check):
            kept_subject, kept = kept_inputs(outbox, job_id)
            subject = subject or kept_subject or safe_subject_name(source.name)
            # The job's audit log (a job given up has one; a refused folder gets its first line
            # here), so that every failed/ folder holds the chain its signed head seals.
            audit = AuditLog(work_dir(outbox, job_id) / AUDIT_FILE, job_id, self.observer, fence=fence.token)
            listing = kept and tree_listing(kept)
            audit.event("job_refused", **self._source_facts(source), subject=subject, code=error.code, message=error.message,
                        inputs=listing.entries if listing else {}, only=sorted(only) if only else None, versions=software_versions(),
                        trust=self.resources.trust_facts())
            record = jsonable(failure_record(job_id, subject, self._origin or source, error))
            try:
                target, record = self._publish_failure(kept or source, outbox, failed_root, subject, job_id, record, audit.path, fence.check,
                                                       only)
            except SealRefused as refused:
                return self._seal_refused(refused, subject, job_id, work_dir(outbox, job_id), bound)
            bound.error("failure_published", code=error.code, failed=str(target))
            remove_leftover_work(outbox, job_id)
            return JobResult(job_id, subject, JobOutcome.FAILED, target, error=record)


def run_job(source: Path, outbox: Path, settings: Settings | None = None, *, demo: bool = False, **options: Any) -> JobResult:
    """Run one job folder (see `Engine.run_job`); loads models for this one call."""
    return Engine(settings, demo=demo).run_job(source, outbox, **options)


def sealed_in_place(folder: Path, *, where: str, job_id: str, outbox: Path) -> str | None:
    """The subject of the job `folder` holds when the signer sealed it as it stands: its
    signature.json's statement is the one its files give now (for `where` and `job_id`), the
    outbox's journal holds that very statement, and a finished job's audit log ends in its
    job_finished line. Else None: a signature.json planted in a folder, or one whose journal
    line a kill prevented, makes nothing published; the job goes on, and its own seal replaces it."""
    import json

    from engine.provenance.trust import journal_path, read_journal, statement_sha256

    try:
        statement = json.loads((Path(folder) / SIGNATURE_FILE).read_text("utf-8")).get("statement") or {}
        subject = statement.get("subject")
        if statement.get("where") != where or statement.get("job_id") != job_id or not isinstance(subject, str):
            return None
        if build_statement(folder, where=where, path=f"{subject}/{job_id}", job_id=job_id, subject=subject) != statement:
            return None
        if where == "outbox":  # a finished job's audit log ends with job_finished, naming the manifest sealed with it
            lines = (Path(folder) / AUDIT_FILE).read_bytes().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            if last.get("event") != "job_finished" or last.get("manifest_sha256") != statement.get("manifest_sha256"):
                return None
        digest = statement_sha256(statement)
        if not any(line.get("statement_sha256") == digest for line in read_journal(journal_path(outbox))):
            return None
        return subject
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def _mark_finished(folder: Path, job_id: str) -> None:
    """The published job's ledger says finished (it is not in the manifest or the head: a kill
    between the rename and this leaves "running", which the next run of the id settles)."""
    ledger_path = folder / LEDGER_FILE
    for partial in folder.glob(f".{LEDGER_FILE}.*.tmp"):  # the ledger is all a run writes there after the rename
        partial.unlink()
    if ledger_path.is_file():
        ledger, _why = Ledger.read(ledger_path)
        if ledger is None:  # torn (a kill inside its write) or rewritten: what the job's sealed audit chain says
            from engine.provenance.audit import read_chain

            ledger = Ledger.from_audit(ledger_path, job_id, "", read_chain(folder / AUDIT_FILE).records)
        if ledger.outcome != LedgerOutcome.FINISHED:
            ledger.set_outcome(LedgerOutcome.FINISHED)


def outbox_of(job_dir: Path) -> Path:
    """The outbox of a work folder (<outbox>/.work/<job-id>)."""
    return Path(job_dir).parent.parent


def find_unfinished_job(outbox: Path, source: Path) -> str | None:
    """The id of the newest unfinished job that came from `source`, if any."""
    candidates = []
    for ledger_path in (outbox / WORK_DIR).glob(f"*/{LEDGER_FILE}"):
        data = Ledger.peek(ledger_path)
        if data and data.get("source") == utf8_safe(str(source)) and data.get("outcome") == LedgerOutcome.RUNNING:
            candidates.append(data["job_id"])
    return max(candidates) if candidates else None


def input_hashes(job: LoadedJob) -> dict[str, str]:
    hashes = {JOB_FILE: sha256_file(job.folder / JOB_FILE)}
    for name, path in zip(job.spec.subject.photos, job.photos):
        hashes[name] = sha256_file(path)
    return dict(sorted(hashes.items()))


def software_versions() -> dict[str, str]:
    versions = {"identity-replication-daemon": engine_version(), "python": platform.python_version()}
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


def _drop_outputs(job_dir: Path) -> None:
    """Remove a failed job's partial outputs, keeping its inputs/, audit log (and any damaged
    chain set aside: evidence, published with the failure) and ledger."""
    if job_dir.is_dir():
        for path in job_dir.iterdir():
            if path.name not in (AUDIT_FILE, LEDGER_FILE, INPUTS_DIR) and not path.name.startswith(DAMAGED_AUDIT_PREFIX):
                remove_tree(path)
