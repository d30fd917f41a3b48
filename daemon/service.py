"""The daemon: watch the inbox, claim one ready job at a time, run it with the engine.

A job's life is a sequence of folders (rq's queued -> started -> finished/failed, on disk):

    inbox/<name>/                         dropped by the lab, being copied, then ready
    <work>/<label>.<job-id>/<name>/       claimed by one daemon (claim files beside it, see claim.py)
    outbox/<subject>/<job-id>/            finished, published by the engine in one rename
    failed/<subject>/<job-id>/            refused or failed: a copy of the inputs + error.json

The claimed folder is removed only after the engine returned "finished" or "failed", i.e.
once its outbox or failed/ copy is complete. An interrupted job (SIGTERM, or the claim was
lost) stays in the work area and resumes from the engine's ledger with the same job id, in
this daemon after a restart or in another daemon that takes the claim over.

Threads: the main thread runs the loop below and receives signals; one worker thread runs the
engine (one job at a time: one GPU); the claim heartbeat renews the lease; watchdog's thread
only wakes the loop; the metrics server answers scrapes.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from daemon.claim import (
    ClaimedJob,
    Heartbeat,
    Owner,
    claim_folder,
    discard,
    empty_trash,
    find_claims,
    release,
    take_over,
)
from daemon.metrics import DaemonMetrics
from daemon.settings import DaemonPaths, DaemonSettings, default_daemon_id, load_daemon_settings  # noqa: F401 - re-exported for callers and tests
from daemon.watch import InboxWatcher, Readiness, Waker
from engine import ConfigError, Engine, Settings
from engine.audit import MANIFEST_FILE
from engine.fsutil import atomic_write_json, copy_folder_as_dropped, fsync_dir, utf8_safe
from engine.job import is_hidden_name, safe_subject_name
from engine.runner import ERROR_FILE, new_job_id
from engine.stages import STAGE_NAMES

# Log a training step every this many steps (and every phase change); metrics see every step.
TRAIN_LOG_EVERY = 10


class Service:
    """One daemon. `run()` blocks until `request_stop()` (SIGTERM) and returns an exit code."""

    def __init__(self, settings: Settings, daemon: DaemonSettings, *, demo: bool = False) -> None:
        self.settings = settings
        self.config = daemon
        self.demo = demo
        self.paths = DaemonPaths.resolve(daemon, settings.root)
        self.daemon_id = daemon.daemon_id or default_daemon_id()
        self.owner = Owner.this_process(self.daemon_id)
        self.log = structlog.get_logger("daemon").bind(daemon_id=self.daemon_id)
        self.metrics = DaemonMetrics(self.daemon_id, stages=STAGE_NAMES, demo=demo)
        self.readiness = Readiness(self.paths.inbox, daemon.stable_seconds)
        self.waker = Waker()
        self.watcher = InboxWatcher(self.paths.inbox, self.waker, polling=daemon.network_share, poll_seconds=daemon.poll_seconds)
        self.heartbeat = Heartbeat(daemon.lease_seconds, self._claim_lost)
        self.engine: Engine | None = None
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._current: ClaimedJob | None = None
        self._recoveries: list[ClaimedJob] = []  # this daemon's own claims from before a restart
        self._takeovers: list[ClaimedJob] = []  # expired or released claims of other daemons
        self._exit_code = 0
        self._last_phase: str | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, loop until stopped, stop cleanly. Raises ConfigError when the
        installation is unusable (folders, models): nothing has been claimed then."""
        self.paths.prepare()
        try:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        except OSError as exc:
            raise ConfigError("invalid_config", f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port} ({exc}); "
                                                "set [daemon] metrics_port / metrics_host or --metrics-port") from None
        self.log.info("metrics_listening", host=self.config.metrics_host, port=self.metrics_port)
        try:
            self.engine = Engine(self.settings, demo=self.demo, observer=self._observe)
            if self._stopping.is_set():
                return 0
            empty_trash(self.paths.work)
            self._recoveries = [job for job in find_claims(self.paths.work)
                                if job.claim and job.claim.daemon_id == self.daemon_id and job.has_folder()]
            self.watcher.start()
            self.metrics.info.info({"daemon_id": self.daemon_id, "watch": self.watcher.kind, "demo": str(self.demo).lower()})
            self.heartbeat.start()
            self.log.info(
                "daemon_started", watch=self.watcher.kind, observer=self.watcher.observer_name, pid=os.getpid(), host=self.owner.host,
                inbox=str(self.paths.inbox), outbox=str(self.paths.outbox), failed=str(self.paths.failed), work=str(self.paths.work),
                stable_seconds=self.config.stable_seconds, scan_seconds=self.config.scan_seconds, lease_seconds=self.config.lease_seconds,
                own_claims_to_recover=[job.job_id for job in self._recoveries], demo=self.demo,
            )
            self._loop()
        except BaseException:
            self._exit_code = self._exit_code or 1
            raise
        finally:
            self._shutdown()
        return self._exit_code

    def request_stop(self, reason: str = "signal") -> None:
        """Stop claiming; the job in flight stops at its next safe point (a checkpoint), stays
        resumable, and its claim is released. Safe to call from a signal handler."""
        if not self._stopping.is_set():
            self._stopping.set()
            if self.engine is not None:
                self.engine.stop_requested.set()
            self.waker.event.set()
            self.log.info("stop_requested", reason=reason, job_id=self._current.job_id if self._current else None)

    def _shutdown(self) -> None:
        self._stopping.set()
        self.watcher.stop()
        if self._worker is not None:
            if self.engine is not None:
                self.engine.stop_requested.set()
            self._worker.join()
            self._worker = None
        self.heartbeat.stop()
        self.metrics.close()
        self.log.info("daemon_stopped", exit_code=self._exit_code)

    # ---- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        tick = max(0.05, min(0.5, self.config.stable_seconds / 4 or 0.5, self.config.scan_seconds))
        next_scan = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if self._worker is not None and not self._worker.is_alive():
                self._worker.join()
                self._worker = None
            try:
                for name in self.waker.take():
                    self.readiness.touch(name, now)
                if now >= next_scan:
                    self._scan(now)
                    next_scan = now + self.config.scan_seconds
                self.readiness.refresh(now)
                if self._worker is None and not self._stopping.is_set():
                    self._start_next()
            except OSError as exc:  # a share that hiccups (EIO, ESTALE, EACCES): say so, try again next tick
                self.log.warning("file_system_error", error=str(exc), filename=exc.filename)
                self.waker.wait(min(1.0, self.config.scan_seconds))
            ready, copying = self.readiness.counts()
            self.metrics.queue_depth.set(ready + len(self._takeovers) + len(self._recoveries))
            self.metrics.inbox_copying.set(copying)
            self.waker.wait(tick)

    def _scan(self, now: float) -> None:
        """Full listing of the inbox and the work area (catches every missed event)."""
        try:
            self.readiness.scan(now)
        except OSError as exc:  # a network share that went away: keep going, say so
            self.log.warning("inbox_unreachable", inbox=str(self.paths.inbox), error=str(exc))
        try:
            claims = find_claims(self.paths.work)
        except OSError as exc:
            self.log.warning("work_area_unreachable", work=str(self.paths.work), error=str(exc))
            return
        wall = time.time()
        current = self._current.container if self._current else None
        recovering = {job.container for job in self._recoveries}
        takeovers = []
        for job in claims:
            if job.container == current or job.container in recovering:
                continue
            if job.has_folder():
                if job.claim is not None and job.claim.expired(wall):
                    takeovers.append(job)
            elif self._is_leftover(job, wall):
                self.log.info("leftover_container_removed", container=job.container.name)
                try:
                    discard(job.container, self.paths.work)
                except OSError as exc:
                    self.log.warning("leftover_container_not_removed", container=job.container.name, error=str(exc))
        self._takeovers = takeovers

    def _is_leftover(self, job: ClaimedJob, wall: float) -> bool:
        """A container without a job folder whose claim is dead: its daemon died between
        creating it and moving the folder in, or while removing it. Never one with a folder."""
        try:
            if any(entry.is_dir() for entry in job.container.iterdir()):
                return False
            old = wall - job.container.stat().st_mtime > self.config.lease_seconds
        except FileNotFoundError:
            return False
        return old and (job.claim is None or job.claim.expired(wall))

    def _start_next(self) -> None:
        """Own claims from before a restart, then claims to take over, then the inbox in arrival order."""
        while self._recoveries:
            job = take_over(self._recoveries.pop(0), self.owner, self.config.lease_seconds, own_restart=True)
            if job is not None:
                self._begin(job, taken_over="restart")
                return
        while self._takeovers:
            seen = self._takeovers.pop(0)
            job = take_over(seen, self.owner, self.config.lease_seconds)
            if job is not None:
                self._begin(job, taken_over="released" if seen.claim and seen.claim.released else "expired")
                return
        for folder in self.readiness.ready_in_arrival_order():
            if not self.readiness.confirm(folder.name, time.monotonic()):
                continue
            self.readiness.forget(folder.name)  # claimed, or gone, or seen again at the next scan
            try:
                job = claim_folder(self.paths.inbox / folder.name, self.paths.work, new_job_id(), self.owner, self.config.lease_seconds)
            except OSError as exc:
                self.log.error("claim_failed", folder=folder.name, error=str(exc), retry_in_seconds=self.config.scan_seconds)
                continue
            if job is None:
                self.log.info("claimed_elsewhere", folder=folder.name)
                continue
            self.log.info("job_claimed", job_id=job.job_id, folder=folder.name, ready_because=folder.ready_because,
                          waited_seconds=round(time.monotonic() - folder.seen_at, 3))
            self._begin(job)
            return

    def _begin(self, job: ClaimedJob, taken_over: str | None = None) -> None:
        assert job.claim is not None
        if taken_over:
            self.metrics.claims_taken_over.labels(taken_over).inc()
            self.log.info("claim_taken_over", job_id=job.job_id, folder=job.claim.folder, reason=taken_over,
                          previous_owner=job.claim.previous_owner, generation=job.generation, crashes=job.claim.crashes)
        self._current = job
        self.heartbeat.hold(job)
        self.metrics.job_in_progress.set(1)
        self._worker = threading.Thread(target=self._run_job, args=(job,), name=f"job-{job.job_id}", daemon=True)
        self._worker.start()

    # ---- one job (worker thread) -------------------------------------------------------

    def _run_job(self, job: ClaimedJob) -> None:
        assert self.engine is not None and job.claim is not None
        started = time.monotonic()
        outcome, code = "crashed", None
        log = self.log.bind(job_id=job.job_id)
        try:
            published = self._published(job.job_id)
            if published:
                # The daemon died after the engine published the job but before the claim
                # was cleared: running it again would run it twice.
                log.info("job_already_published", outcome=published)
                outcome = published
            elif job.claim.crashes >= self.config.max_crashes:
                outcome, code = "failed", "too_many_crashes"
                self._give_up(job, log)
            else:
                result = self.engine.run_job(job.folder, self.paths.outbox, job_id=job.job_id, failed_dir=self.paths.failed)
                outcome = result.outcome
                code = result.error.get("code") if result.error else None
        except ConfigError as error:
            # The installation is at fault, not the job: keep it resumable and stop this daemon.
            log.error("installation_error", code=error.code, message=error.message)
            outcome, self._exit_code = "interrupted", 2
            self.request_stop("installation_error")
        except Exception:  # noqa: BLE001 - a bug must not strand the job: release it, counted as a crash
            log.exception("job_crashed")
        held = self.heartbeat.drop()
        if held is None:
            outcome = "lost"
        else:
            self._settle(held, outcome, log)
        seconds = time.monotonic() - started
        self.metrics.job_ended(outcome, seconds, code)
        log.info("job_ended", outcome=outcome, code=code, seconds=round(seconds, 3), folder=job.claim.folder)
        self._current = None
        if not self._stopping.is_set() and self.engine is not None:
            self.engine.stop_requested.clear()  # set by a lost claim; not by SIGTERM
        self.waker.event.set()

    def _settle(self, job: ClaimedJob, outcome: str, log: Any) -> None:
        """Remove the claimed folder once its outbox/failed copy is complete; otherwise release it."""
        try:
            if outcome in ("finished", "failed"):
                discard(job.container, self.paths.work)
            elif not release(job, crashed=outcome == "crashed"):
                log.warning("claim_lost_before_release")
        except OSError as exc:
            log.error("claim_not_settled", outcome=outcome, error=str(exc))

    def _published(self, job_id: str) -> str | None:
        """"finished" / "failed" when the engine already published this job id, else None."""
        for base, marker, outcome in ((self.paths.outbox, MANIFEST_FILE, "finished"), (self.paths.failed, ERROR_FILE, "failed")):
            for path in glob.glob(os.path.join(glob.escape(str(base)), "*", glob.escape(job_id), marker)):
                if not is_hidden_name(Path(path).parent.parent.name):
                    return outcome
        return None

    def _give_up(self, job: ClaimedJob, log: Any) -> None:
        """Copy the inputs to failed/ with error.json (as the engine does for a failed job)."""
        assert job.claim is not None
        subject = safe_subject_name(job.claim.folder)
        target = self.paths.failed / subject / job.job_id
        staging = target.with_name(f".{job.job_id}.incoming")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        copy_folder_as_dropped(job.folder, staging)
        message = (f"runs of this job ended without a clean stop {job.claim.crashes} times (daemon killed, out of memory, "
                   f"or frozen past its lease; [daemon] max_crashes = {self.config.max_crashes}); it was given up so that it "
                   f"cannot take down one daemon after another. The engine's work folder, if any, is kept under "
                   f"{self.paths.outbox / '.work'}.")
        atomic_write_json(staging / ERROR_FILE, {
            "job_id": job.job_id, "subject": subject, "source": utf8_safe(str(job.folder)), "failed_at": _now_iso(),
            "code": "too_many_crashes", "message": message, "problems": [],
            "details": {"crashes": job.claim.crashes, "last_owner": job.claim.previous_owner},
        })
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_dir(target.parent)
        log.error("job_given_up", code="too_many_crashes", crashes=job.claim.crashes, failed=str(target))

    def _claim_lost(self, job: ClaimedJob) -> None:
        """Heartbeat thread: another daemon owns the job now. Stop at the next safe point and
        touch nothing of it afterwards (the other daemon resumes from the checkpoints)."""
        self.metrics.claims_lost.inc()
        self.log.error("claim_lost", job_id=job.job_id, generation=job.generation)
        if self.engine is not None:
            self.engine.stop_requested.set()

    # ---- engine events (worker thread) -------------------------------------------------

    def _observe(self, event: str, fields: dict[str, Any]) -> None:
        """Engine audit/progress events -> metrics, and the few worth a daemon log line."""
        try:
            self.metrics.observe(event, fields)
            job_id = self._current.job_id if self._current else None
            if event == "stage_started":
                self.log.info("stage_started", job_id=job_id, stage=fields.get("stage"))
            elif event == "job_resumed":
                self.log.info("job_resuming", job_id=job_id, completed_stages=fields.get("completed_stages"))
            elif event == "train_checkpoint":
                self.log.info("train_checkpoint", job_id=job_id, step=fields.get("step"))
            elif event == "train_resumed":
                self.log.info("training_resumed", job_id=job_id, step=fields.get("step"), phase=fields.get("phase"))
            elif event == "train_step":
                step = int(fields.get("step", 0))
                if step % TRAIN_LOG_EVERY == 0 or fields.get("phase") != self._last_phase:
                    self.log.info("train_progress", job_id=job_id, step=step, phase=fields.get("phase"), loss=fields.get("loss"))
                self._last_phase = fields.get("phase")
            elif event in ("seed_scored", "render_scored"):
                progress = self.metrics.progress
                self.log.info("stage_progress", job_id=job_id, stage=progress.stage, done=progress.done, planned=progress.total, at=progress.at)
        except Exception:  # noqa: BLE001 - a metrics bug must never fail a job
            self.log.exception("observer_failed", event=event)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
