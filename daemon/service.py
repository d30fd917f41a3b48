"""The daemon: watch the inbox, claim one ready job at a time, run it with the engine.

A job's life is a sequence of folders (rq's queued -> started -> finished/failed, on disk):

    inbox/<name>/                         dropped by the lab, being copied, then ready
    <work>/<label>.<job-id>/<name>/       claimed by one daemon (claim files beside it, see claim.py)
    outbox/<subject>/<job-id>/            finished, published by the engine in one rename, with
                                          inputs/: the dropped folder, byte for byte
    failed/<subject>/<job-id>/            refused or failed: inputs/ + error.json + audit.jsonl

At every instant each dropped file is, byte for byte, in the inbox, in the claimed folder, or in
a published job's inputs/ (the claimed folder is removed only once the published copy exists,
was verified by hash, and matches the claimed folder). Writes into a claimed folder while its
job ran (a person whose shell sat in it) are not lost either: the job ran from its own verified
copy, and the claimed folder as it is then goes to failed/ under a new job id
(`changed_after_claim`) before anything is removed.

When the disk, a share or a permission fails a job (the engine says "held": disk_full,
outbox_unwritable, io_error), the job stays claimed and is released on hold: it is retried after
`hold_retry_seconds`, doubled at each hold in a row; the folders are probed again, and while one
fails its probe the daemon claims nothing new (`idrep_ready` 0, a `claiming_paused` line naming
the path). Such faults never count as crashes; `too_many_crashes` is for runs that really died.

An interrupted job (SIGTERM, or the claim was lost) stays in the work area and resumes from the
engine's ledger with the same job id, in this daemon after a restart or in another daemon that
takes the claim over. A daemon that lost its claim (it was frozen past its lease) writes nothing
more: the engine asks the claim's fence before every write.

Where a claimed job runs is the backend's business (daemon/cluster.py): `local` runs it in this
process with its own engine, one at a time (one GPU); `ray` runs one job per worker of a Ray
cluster at once, each attempt under a claim generation of its own: an attempt lost with its node
is run again on another (the claim's next generation, counted as a crash) and the lost one, if
it still runs, writes nothing more.

Threads: the main thread runs the loop below and receives signals; one thread per job in flight
runs it through the backend; the claim heartbeat renews the leases and the daemon's presence;
watchdog's thread only wakes the loop; the metrics server's event loop (one thread) answers scrapes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.claim import (
    REFUSED_DIR,
    ClaimedJob,
    Heartbeat,
    Owner,
    claim_folder,
    discard,
    empty_trash,
    find_claims,
    next_attempt,
    release,
    take_over,
)
from daemon.cluster import AttemptLost, Backend, make_backend
from daemon.clock import ShareClock
from daemon.metrics import CRASHED, DaemonMetrics
from daemon.presence import Presence, register
from daemon.settings import DaemonPaths, DaemonSettings, default_daemon_id, load_daemon_settings  # noqa: F401 - re-exported for callers and tests
from daemon.watch import InboxWatcher, Readiness, Waker
from engine import ConfigError, Engine, JobError, JobOutcome, JobResult, OwnershipLost, Settings
from engine.jobfolder import (INPUTS_DIR, all_stage_names, atomic_write_json, set_umask, classify_os_error, describe_os_error, find_published,
                              inputs_changed, new_job_id, safe_subject_name, utf8_safe)

# Log a training step every this many steps (and every phase change); metrics see every step.
TRAIN_LOG_EVERY = 10
PUBLISHED = (JobOutcome.FINISHED, JobOutcome.FAILED)  # outcomes after which the job is in the outbox or failed/
HOLD_RETRY_MAX_SECONDS = 3600.0


@dataclass
class _Unsettled:
    """A job's claim whose settling (release or removal) the work area refused: held and renewed
    meanwhile, and tried again at `retry_at` (monotonic seconds), waiting longer each time."""

    job: ClaimedJob
    outcome: str
    error: dict[str, Any] | None
    retry_at: float
    delay: float


@dataclass
class _Run:
    """A job in flight: its claim and fence (a new generation for each attempt) and its thread."""

    job: ClaimedJob
    fence: Any
    thread: threading.Thread | None = None


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
        self.metrics = DaemonMetrics(self.daemon_id, stages=all_stage_names(), demo=demo)
        self.readiness = Readiness(self.paths.inbox, daemon.stable_seconds)
        self.waker = Waker()
        self.watcher = InboxWatcher(self.paths.inbox, self.waker, polling=daemon.network_share, poll_seconds=daemon.poll_seconds)
        self.clock = ShareClock(self.paths.work, self.daemon_id)
        self.heartbeat = Heartbeat(daemon.lease_seconds, self._claim_lost, self.clock.now, also=self._renew_presence,
                                   on_fault=self._renew_fault)
        self.engine: Engine | None = None
        self.backend: Backend | None = None
        self.presence: Presence | None = None
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._running: dict[Path, _Run] = {}  # by container; changed by the loop's thread only
        self._job_id = threading.local()  # the job of the thread the engine's observer is called in
        self._recoveries: list[ClaimedJob] = []  # this daemon's own claims from before a restart
        self._takeovers: list[ClaimedJob] = []  # expired, released or due held claims of any daemon
        self._paused: str = ""  # why claiming is paused (a folder failed its probe); "" = claiming
        self._probe_due = False  # a disk fault was met beside the loop (a renewal, a settling): probe at the next tick
        # Claims the work area refused to settle, and claims whose lease ran out on a disk fault (to be
        # recorded as held): added by a job's thread as it ends (before the loop forgets its run),
        # retried and removed by the loop's; one dict operation at a time, each atomic.
        self._unsettled: dict[Path, _Unsettled] = {}
        self._lapsed: dict[Path, tuple[ClaimedJob, str]] = {}
        self._skewed = False
        self._unreachable: dict[str, str] = {}  # scan event (inbox_unreachable, work_area_unreachable) -> the error last said
        self._exit_code = 0
        self._last_phase: str | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, loop until stopped, stop cleanly. Raises ConfigError when the
        installation is unusable (folders, models, a daemon id in use): nothing has been claimed then."""
        if self.config.umask:
            set_umask(int(self.config.umask, 8))  # before the first file: outputs, failed/ copies, claims
        self.paths.prepare()
        # Before anything slow: a second process with this daemon id is refused at once.
        self.presence = register(self.paths.work, self.owner, self.config.lease_seconds, self.clock)
        self.heartbeat.start()  # renews the presence from now on (and the claims, once there are)
        try:
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                raise ConfigError("invalid_config", f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port} ({exc}); "
                                                    "set [daemon] metrics_port / metrics_host or --metrics-port") from None
            self.log.info("metrics_listening", host=self.config.metrics_host, port=self.metrics_port)
            self.engine = self._load_engine()
            if self.engine is None or self._stopping.is_set():
                return self._exit_code
            self.backend = make_backend(self.config.backend, self.engine, self.settings, self.config, demo=self.demo, daemon_id=self.daemon_id)
            self.backend.start()
            if self._stopping.is_set():  # a SIGTERM while the backend connected to its cluster
                return self._exit_code
            self.metrics.attempts_lost.labels(self.backend.name)
            empty_trash(self.paths.work)
            self._recoveries = [job for job in find_claims(self.paths.work)
                                if job.claim and job.claim.daemon_id == self.daemon_id and job.has_folder()]
            self.watcher.start()
            self.metrics.info.info({"daemon_id": self.daemon_id, "watch": self.watcher.kind, "demo": str(self.demo).lower(),
                                    "backend": self.backend.name})
            self.metrics.ready.set(1)
            self.log.info(
                "daemon_started", watch=self.watcher.kind, observer=self.watcher.observer_name, pid=os.getpid(), host=self.owner.host,
                inbox=str(self.paths.inbox), outbox=str(self.paths.outbox), failed=str(self.paths.failed), work=str(self.paths.work),
                stable_seconds=self.config.stable_seconds, scan_seconds=self.config.scan_seconds, lease_seconds=self.config.lease_seconds,
                own_claims_to_recover=[job.job_id for job in self._recoveries], demo=self.demo, presence_generation=self.presence.generation,
                backend=self.backend.name, workers_ready=self.backend.capacity(),
            )
            self._loop()
        except ConfigError:
            self._exit_code = 2  # what __main__ exits with for a refusal: daemon_stopped says the same
            raise
        except BaseException:
            self._exit_code = self._exit_code or 1
            raise
        finally:
            self._shutdown()
        return self._exit_code

    def _load_engine(self) -> Engine | None:
        """The engine, once every model it needs is staged. Until then (weights not copied yet,
        a share not mounted yet) serve /metrics with idrep_ready 0 and idrep_models_missing, log
        `models_missing` naming every file and where it goes, and look again every
        models_retry_seconds: a restart policy would only loop. None when stopped meanwhile."""
        missing: list[str] = []
        while not self._stopping.is_set():
            try:
                engine = Engine(self.settings, demo=self.demo, observer=self._observe)
            except ConfigError as error:
                if error.code != "model_missing":
                    raise
                now_missing = [str(problem) for problem in error.problems] or [error.message]
                if now_missing != missing:
                    self.log.error("models_missing", missing=now_missing, models_dir=str(self.settings.models_dir),
                                   retry_seconds=self.config.models_retry_seconds,
                                   note="no job is claimed until these are staged; `python -m engine models check` lists them")
                missing = now_missing
                self.metrics.models_missing.set(len(missing))
                self.metrics.ready.set(0)
                self._stopping.wait(self.config.models_retry_seconds)
                continue
            if missing:
                self.log.info("models_staged", were_missing=len(missing))
            self.metrics.models_missing.set(0)
            return engine
        return None

    def request_stop(self, reason: str = "signal") -> None:
        """Stop claiming; the job in flight stops at its next safe point (at most one denoising
        step or training checkpoint away), stays resumable, and its claim is released. Safe to
        call from a signal handler."""
        if not self._stopping.is_set():
            self._stopping.set()
            if self.backend is not None:
                self.backend.stop_jobs()
            elif self.engine is not None:
                self.engine.stop_requested.set()
            self.waker.event.set()
            self.log.info("stop_requested", reason=reason, job_ids=[run.job.job_id for run in list(self._running.values())])

    def _shutdown(self) -> None:
        self._stopping.set()
        self.watcher.stop()
        if self._running and self.backend is not None:
            self.backend.stop_jobs()
        for run in list(self._running.values()):
            if run.thread is not None:
                run.thread.join()
        self._running.clear()
        if self._unsettled or self._lapsed:
            self._settle_later(float("inf"))  # once more; what the disk still refuses expires, and is taken over
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:  # noqa: BLE001 - the claims are settled; a cluster that will not say goodbye must not hang the stop
                self.log.exception("backend_not_closed", backend=self.backend.name)
        self.heartbeat.stop()
        if self.presence is not None:
            try:
                self.presence.release()
            except OSError as exc:
                self.log.warning("presence_not_released", error=str(exc))
        self.metrics.close()
        self.log.info("daemon_stopped", exit_code=self._exit_code)

    def _renew_presence(self) -> None:
        """Heartbeat thread: keep this daemon's presence fresh; a later generation means another
        process took this daemon id over while this one was frozen: stop, writing nothing more."""
        if self.presence is not None and not self.presence.renew():
            self.log.error("daemon_id_taken_over_by_another_process", daemon_id=self.daemon_id)
            self._exit_code = self._exit_code or 1
            self.heartbeat.lose(f"daemon id {self.daemon_id} was taken over by another process")
            self.request_stop("daemon_id_taken_over")

    # ---- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        tick = max(0.05, min(0.5, self.config.stable_seconds / 4 or 0.5, self.config.scan_seconds))
        next_scan = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            for container, run in list(self._running.items()):
                if run.thread is not None and not run.thread.is_alive():
                    run.thread.join()
                    del self._running[container]
            self.metrics.job_in_progress.set(len(self._running))
            try:
                if self._probe_due:
                    self._probe_due = False
                    self._probe_folders()
                if self._unsettled or self._lapsed:
                    self._settle_later(now)
                for name in self.waker.take():
                    self.readiness.touch(name, now)
                if now >= next_scan:
                    self._scan(now)
                    next_scan = now + self.config.scan_seconds
                self.readiness.refresh(now)
                if not self._stopping.is_set() and not self._paused and self.backend is not None \
                        and len(self._running) < self.backend.capacity():
                    self._start_next()
            except OSError as exc:  # a share that hiccups (EIO, ESTALE, EACCES): say so, look at the folders, try again
                self.log.warning("file_system_error", error=str(exc), filename=exc.filename)
                self._probe_folders()
                self.waker.wait(min(1.0, self.config.scan_seconds))
            ready, copying = self.readiness.counts()
            self.metrics.queue_depth.set(ready + len(self._takeovers) + len(self._recoveries))
            self.metrics.inbox_copying.set(copying)
            self.metrics.inbox_unreadable.set(len(self.readiness.unreadable()))
            self.waker.wait(tick)

    def _probe_folders(self) -> bool:
        """Probe every folder the daemon writes; pause claiming while one fails (True: all well)."""
        problems = self.paths.probe()
        if problems and not self._paused:
            self.log.error("claiming_paused", problems=problems)
        elif not problems and self._paused:
            self.log.info("claiming_resumed", was=self._paused)
        self._paused = "; ".join(problems)
        self.metrics.ready.set(0 if problems else 1)
        return not problems

    def _scan(self, now: float) -> None:
        """Full listing of the inbox and the work area (catches every missed event)."""
        if self._paused:
            self._probe_folders()
        try:
            self.readiness.scan(now)
            self._say_unreachable("inbox_unreachable", None)
        except OSError as exc:  # a network share that went away: keep going, say so
            self._say_unreachable("inbox_unreachable", exc, inbox=str(self.paths.inbox))
        try:
            claims = find_claims(self.paths.work)
            share_now = self.clock.now()
            self._say_unreachable("work_area_unreachable", None)
        except OSError as exc:
            self._say_unreachable("work_area_unreachable", exc, work=str(self.paths.work))
            return
        self._check_clock(share_now)
        recovering = {job.container for job in self._recoveries}
        takeovers = []
        for job in claims:
            if job.container in self._running or job.container in recovering or job.container in self._unsettled \
                    or job.container in self._lapsed:
                continue  # in hand; a lapsed claim is recorded as held before anyone takes it over
            if job.has_folder():
                if job.takeable(share_now):
                    takeovers.append(job)
            elif self._is_leftover(job, share_now):
                self.log.info("leftover_container_removed", container=job.container.name)
                try:
                    discard(job.container, self.paths.work)
                except OSError as exc:
                    self.log.warning("leftover_container_not_removed", container=job.container.name, error=str(exc))
        self.metrics.jobs_held.set(sum(1 for job in claims if job.claim is not None and job.claim.held))
        self._takeovers = takeovers

    def _say_unreachable(self, event: str, exc: OSError | None, **where: str) -> None:
        """Log a folder the scan could not read once per change of error (not on every scan), and
        when it can be read again."""
        error = describe_os_error(exc) if exc is not None else ""
        before = self._unreachable.get(event, "")
        if error and error != before:
            self.log.warning(event, error=error, **where)
        elif not error and before:
            self.log.info(event.replace("unreachable", "reachable_again"), was=before)
        self._unreachable[event] = error

    def _check_clock(self, share_now: float) -> None:
        skew = time.time() - share_now
        self.metrics.clock_skew.set(round(skew, 3))
        skewed = abs(skew) > self.config.lease_seconds / 10
        if skewed and not self._skewed:
            self.log.warning("clock_skew", seconds=round(skew, 3), share=str(self.paths.work), lease_seconds=self.config.lease_seconds,
                             note="this host's wall clock differs from the share's; leases are judged on the share's clock, "
                                  "but job ids and log times use this host's: set up NTP")
        self._skewed = skewed

    def _is_leftover(self, job: ClaimedJob, share_now: float) -> bool:
        """A container without a job folder whose claim is dead: its daemon died between
        creating it and moving the folder in, or while removing it. Never one with a folder."""
        try:
            if any(entry.is_dir() for entry in job.container.iterdir()):
                return False
            old = share_now - job.container.stat().st_mtime > self.config.lease_seconds
        except FileNotFoundError:
            return False
        return old and (job.claim is None or job.takeable(share_now))

    def _start_next(self) -> None:
        """Own claims from before a restart, then claims to take over, then the inbox in arrival order."""
        share_now = self.clock.now() if self._recoveries or self._takeovers else 0.0
        while self._recoveries:
            seen = self._recoveries.pop(0)
            job = take_over(seen, self.owner, self.config.lease_seconds, share_now, own_restart=True)
            if job is not None:
                self._begin(job, taken_over="restart" if seen.claim is None or not seen.claim.held else "held")
                return
            self._takeovers.append(seen)  # its process may be alive (frozen): wait for its lease like anyone
        while self._takeovers:
            seen = self._takeovers.pop(0)
            job = take_over(seen, self.owner, self.config.lease_seconds, share_now)
            if job is not None:
                reason = "held" if seen.claim and seen.claim.held else ("released" if seen.claim and seen.claim.released else "expired")
                self._begin(job, taken_over=reason)
                return
        inbox_device = os.stat(self.paths.inbox).st_dev
        for folder in self.readiness.ready_in_arrival_order():
            if not self.readiness.confirm(folder.name, time.monotonic()):
                continue
            self.readiness.forget(folder.name)  # claimed, or gone, or seen again at the next scan
            source = self.paths.inbox / folder.name
            try:
                if os.lstat(source).st_dev != inbox_device:
                    self._refuse_mount_point(source)
                    continue
                job = claim_folder(source, self.paths.work, new_job_id(), self.owner, self.config.lease_seconds)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log.error("claim_failed", folder=folder.name, error=describe_os_error(exc), retry_in_seconds=self.config.scan_seconds)
                self._probe_folders()
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
        run = _Run(job, self.heartbeat.hold(job))
        run.thread = threading.Thread(target=self._run_job, args=(run,), name=f"job-{job.job_id}", daemon=True)
        self._running[job.container] = run
        self.metrics.job_in_progress.set(len(self._running))
        run.thread.start()

    # ---- inbox folders refused without a claim -----------------------------------------

    def _refuse_mount_point(self, source: Path) -> None:
        """A job folder that is a mount point cannot be claimed (a rename cannot move it): its
        content goes to failed/ once, with `mount_point`; the folder itself is left as it is."""
        info = os.lstat(source)
        key = hashlib.sha256(f"{source.name}\0{info.st_dev}\0{info.st_ino}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        marker = self.paths.work / REFUSED_DIR / f"{key}.json"
        if marker.exists():
            return  # refused before; `daemon status` lists it
        job_id, subject = new_job_id(), safe_subject_name(source.name)
        error = JobError("mount_point", f"{utf8_safe(source.name)} is a mount point, not a folder of the inbox's file system: a job is "
                                       "claimed by a rename, which cannot move a mount; its content was copied here. Copy the folder into "
                                       "the inbox instead of mounting it there, then unmount and remove it")
        assert self.engine is not None
        try:
            target = self.engine.publish_refusal(error, source, self.paths.outbox, self.paths.failed, job_id=job_id, subject=subject).output_dir
            atomic_write_json(marker, {"folder": utf8_safe(source.name), "st_dev": info.st_dev, "st_ino": info.st_ino,
                                       "job_id": job_id, "failed": str(target), "reason": "mount_point"})
        except OSError as exc:
            self.log.error("refusal_not_published", folder=utf8_safe(source.name), code="mount_point", error=describe_os_error(exc))
            self._probe_folders()
            return
        self.metrics.jobs.labels(JobOutcome.FAILED).inc()
        self.metrics.job_failures.labels("mount_point").inc()
        self.log.error("job_refused", job_id=job_id, folder=utf8_safe(source.name), code="mount_point", failed=str(target))

    # ---- one job (worker thread) -------------------------------------------------------

    def _run_job(self, run: _Run) -> None:
        assert self.engine is not None and self.backend is not None and run.job.claim is not None
        started = time.monotonic()
        outcome, code, error, output, node = CRASHED, None, None, None, ""
        log = self.log.bind(job_id=run.job.job_id)
        self._job_id.value = run.job.job_id
        try:
            outcome, code, error, output, node = self._attempt(run, log)
        except ConfigError as config_error:
            # The installation is at fault, not the job: keep it resumable and stop this daemon.
            log.error("installation_error", code=config_error.code, message=config_error.message)
            outcome, self._exit_code = JobOutcome.INTERRUPTED, 2
            self.request_stop("installation_error")
        except OwnershipLost as lost:
            log.error("claim_lost_while_settling", at=lost.where)
            outcome = JobOutcome.LOST
        except OSError as exc:  # the daemon's own look at the job's folders failed: the disk or share, not the job
            code, error = self._hold_record(exc, "the job's folders could not be read")
            outcome = JobOutcome.HELD
            log.error("job_folders_unreadable", code=code, error=describe_os_error(exc))
        except BaseException as exc:  # noqa: BLE001 - a bug must not strand the job: it is released, counted as a crash
            outcome, code, error = self._crashed(run.job, exc, log)
        finally:
            try:
                self._settle(run.job, outcome, error, log)
            except BaseException:  # noqa: BLE001 - settling failed: the claim stays, and expires for a retry
                log.exception("claim_not_settled", outcome=outcome)
            seconds = time.monotonic() - started
            self.metrics.job_ended(outcome, seconds, code)
            self.metrics.job_ran(self.backend.name, node, outcome)
            where = {"output": str(output)} if output is not None and outcome in PUBLISHED else {}
            log.info("job_ended", outcome=outcome, code=code, seconds=round(seconds, 3), folder=run.job.claim.folder,
                     backend=self.backend.name, node=node, **where)
            if not self._stopping.is_set():
                self.backend.resume_jobs()
            self.waker.event.set()

    def _crashed(self, job: ClaimedJob, exc: BaseException, log: Any) -> tuple[str, str | None, dict[str, Any] | None]:
        """A run that raised. Before its publishing rename: a crash (released, counted, retried).
        After it (the job is in the outbox or failed/): a publication problem, held and retried
        after the hold's back-off: never counted as a crash, never given up into failed/, never
        re-run in a loop (the give-up check skips published jobs, so it must not come to that)."""
        try:
            published = find_published(self.paths.outbox, self.paths.failed, job.job_id)
        except OSError:
            published = None
        if published is None:
            log.exception("job_crashed")
            return CRASHED, None, None
        message = (f"job {job.job_id} is published ({published[1]}), but settling it failed: {type(exc).__name__}: {exc}; held, "
                   "retried after the hold's back-off (never run again, never put in failed/)")
        log.error("publication_incomplete", message=message, published_as=published[0], exc_info=exc)
        return JobOutcome.HELD, "publication_incomplete", {"code": "publication_incomplete", "message": message, "problems": [],
                                                           "details": {"published_as": published[0], "published": str(published[1])}}

    def _attempt(self, run: _Run, log: Any) -> tuple[str, str | None, dict[str, Any] | None, Path | None, str]:
        """Run the job (or settle one already published) through the backend, again under the
        claim's next generation each time an attempt is lost with its node; returns (outcome,
        code, error, where it was published: the outbox's folder or failed/'s, the node)."""
        assert self.engine is not None and self.backend is not None
        lost_in_a_row, node = 0, ""
        while True:
            job = run.job
            assert job.claim is not None
            if (job.claim.crashes >= self.config.max_crashes or lost_in_a_row > self.config.ray.max_retries) \
                    and find_published(self.paths.outbox, self.paths.failed, job.job_id) is None:
                result = self._give_up(job, run.fence, log)
                break
            try:
                # Also for a job already published (the daemon died after the engine's publishing
                # rename, before the claim was cleared): the engine then only settles what a kill can
                # leave (its journal line, a leftover work folder) and never runs it twice.
                result, node = self.backend.run_job(job, run.fence, outbox=self.paths.outbox, failed=self.paths.failed,
                                                    origin=self.paths.inbox / job.claim.folder)
                break
            except AttemptLost as lost:
                lost_in_a_row += 1
                self._next_attempt(run, lost, lost_in_a_row, log)
        code = result.error.get("code") if result.error else None
        if result.outcome in PUBLISHED:
            held = self._check_claimed_folder(run.job, result.output_dir, run.fence, log)
            if held is not None:
                return JobOutcome.HELD, held["code"], held, None, node
        return result.outcome, code, result.error, result.output_dir, node

    def _next_attempt(self, run: _Run, lost: AttemptLost, in_a_row: int, log: Any) -> None:
        """The attempt was lost with its worker: take the claim's next generation (which shuts the
        lost attempt's fence wherever it still runs; a crash on the claim's count) for the next."""
        assert self.backend is not None
        job = next_attempt(run.job, self.owner, self.config.lease_seconds)
        if job is None:
            raise OwnershipLost("take the next claim generation after a lost attempt: the claim is no longer this daemon's")
        assert job.claim is not None
        run.job, run.fence = job, self.heartbeat.hold(job)
        self.metrics.attempts_lost.labels(self.backend.name).inc()
        log.error("attempt_lost", node=lost.node, why=lost.why, generation=job.generation, crashes=job.claim.crashes, lost_in_a_row=in_a_row,
                  max_retries=self.config.ray.max_retries, note="the next attempt resumes from the job's ledger on another worker")

    def _give_up(self, job: ClaimedJob, fence: Any, log: Any) -> JobResult:
        """Publish the job to failed/ as too_many_crashes, from the engine's verified copy of its
        inputs when there is one (the engine's publish_refusal: the one failure publisher)."""
        assert self.engine is not None and job.claim is not None
        error = JobError("too_many_crashes",
                         f"runs of this job ended without a clean stop {job.claim.crashes} times (daemon killed, out of memory, frozen "
                         f"past its lease, or lost with its cluster node; [daemon] max_crashes = {self.config.max_crashes}, [daemon.ray] "
                         f"max_retries = {self.config.ray.max_retries}); it was given up so that it cannot take down one daemon or node "
                         "after another", details={"crashes": job.claim.crashes, "last_owner": job.claim.previous_owner,
                                                   "backend": self.config.backend})
        try:
            result = self.engine.publish_refusal(error, job.folder, self.paths.outbox, self.paths.failed, job_id=job.job_id, fence=fence,
                                                 origin=self.paths.inbox / job.claim.folder)
        except OSError as exc:
            _code, record = self._hold_record(exc, "too_many_crashes could not be published to failed/")
            return JobResult(job.job_id, safe_subject_name(job.claim.folder), JobOutcome.HELD, job.folder, error=record)
        log.error("job_given_up", code="too_many_crashes", crashes=job.claim.crashes, failed=str(result.output_dir))
        return result

    def _check_claimed_folder(self, job: ClaimedJob, published: Path, fence: Any, log: Any) -> dict[str, Any] | None:
        """Before the claimed folder goes: does it still hold exactly what the job copied? Files
        written into it while the job ran (it ran from its own copy) go to failed/ under a new job
        id, `changed_after_claim`, so that nothing dropped is ever lost. Returns a hold record
        when that copy cannot be made (the claimed folder then stays)."""
        if not job.folder.is_dir():
            log.warning("claimed_folder_gone", note="removed while its job ran; the job's copy holds it")
            return None
        try:
            changes = inputs_changed(job.folder, published)
        except OSError as exc:
            return self._hold_record(exc, "the claimed folder could not be compared with the published inputs")[1]
        if changes is None:
            return None
        if not changes["added"] and not changes["changed"]:
            log.warning("claimed_folder_changed", removed=changes["removed"], note="files removed while the job ran; the job's copy holds them")
            return None
        job_id = new_job_id()
        assert job.claim is not None
        subject = safe_subject_name(job.claim.folder)
        written = changes["added"] + changes["changed"]
        error = JobError("changed_after_claim",
                         f"files of the job folder were written after job {job.job_id} had copied it (while it ran): "
                         f"{', '.join(written[:10])}. Job {job.job_id} ran from the folder as it was when claimed "
                         f"({published / INPUTS_DIR}); the files written afterwards are kept here (the rest is there). To run them, "
                         "make a job folder of them and drop it again.",
                         details={"ran_as": job.job_id, "published": str(published), **changes})
        try:
            refused = self.engine.publish_refusal(error, job.folder, self.paths.outbox, self.paths.failed, job_id=job_id, subject=subject,
                                                  only=frozenset(written), fence=fence, origin=self.paths.inbox / job.claim.folder)
        except OSError as exc:
            return self._hold_record(exc, "the claimed folder, changed while its job ran, could not be copied to failed/")[1]
        log.error("claimed_folder_changed", failed=str(refused.output_dir), new_job_id=job_id, **changes)
        self.metrics.job_failures.labels("changed_after_claim").inc()
        return None

    def _hold_record(self, exc: OSError, what: str) -> tuple[str, dict[str, Any]]:
        code = classify_os_error(exc) or "io_error"
        return code, {"code": code, "message": f"{what}: {describe_os_error(exc)}; the job stays claimed, nothing was lost", "problems": [],
                      "details": {"errno": exc.errno, "path": utf8_safe(str(exc.filename or ""))}}

    def _settle(self, job: ClaimedJob, outcome: str, error: dict[str, Any] | None, log: Any) -> None:
        """Finished or failed (published, and the claimed folder checked): remove the container.
        Held: release it on hold for a later retry, and probe the folders. Interrupted or
        crashed: release it now. Lost: touch nothing (another daemon owns it), unless the lease
        ran out because the work area failed the renewals: that is recorded in the claim once the
        disk is back (`_lapsed`). When the work area refuses the settling itself (full, read-only),
        the claim stays held and renewed, and the settling is tried again (`_unsettled`)."""
        lapsed_on = self.heartbeat.lapsed_on(job.container)
        held = self.heartbeat.current(job.container)
        if held is None or outcome == JobOutcome.LOST:
            self.heartbeat.drop(job.container)
            if lapsed_on:
                self._lapse(job, lapsed_on, log)
            elif outcome != JobOutcome.LOST:
                log.warning("claim_lost_before_settling", outcome=outcome)
            return
        try:
            self._settle_claim(held, outcome, error, log)
        except OSError as exc:
            delay = self.config.scan_seconds
            self._unsettled[held.container] = _Unsettled(held, outcome, error, time.monotonic() + delay, delay)
            log.error("claim_not_settled", outcome=outcome, error=describe_os_error(exc), retry_in_seconds=delay,
                      note="the claim stays held (its lease renewed) and the settling is tried again: a disk fault is no crash")
            self._probe_due = True
            self.waker.event.set()
            return
        self.heartbeat.drop(held.container)

    def _settle_claim(self, held: ClaimedJob, outcome: str, error: dict[str, Any] | None, log: Any) -> None:
        if outcome in PUBLISHED:
            discard(held.container, self.paths.work)
        elif outcome == JobOutcome.HELD:
            assert held.claim is not None
            retry = min(self.config.hold_retry_seconds * 2 ** held.claim.holds, HOLD_RETRY_MAX_SECONDS)
            reason = f"{(error or {}).get('code', 'io_error')}: {(error or {}).get('message', '')}"[:500]
            if not release(held, held=reason, retry_seconds=retry):
                log.warning("claim_lost_before_release")
            log.error("job_held", reason=reason, retry_in_seconds=retry, holds=held.claim.holds + 1)
            self._probe_due = True
        elif not release(held, crashed=outcome == CRASHED):
            log.warning("claim_lost_before_release")

    def _lapse(self, job: ClaimedJob, fault: str, log: Any) -> None:
        """The claim's lease ran out while the work area refused its renewals: the job stopped as
        lost, though no daemon died. It is released on hold as soon as the work area takes a write
        again (if no daemon took it over meanwhile), so that taking it over counts no crash."""
        self.metrics.claim_lapses.inc()
        log.error("lease_lapsed_on_disk_fault", fault=fault, generation=job.generation,
                  note="recorded in the claim (held) once the work area takes writes again; never counted as a crash")
        self._lapsed[job.container] = (job, fault)
        self._probe_due = True
        self.waker.event.set()

    def _settle_later(self, now: float) -> None:
        """Loop thread: try again the settlings the work area refused, and record the lapsed leases."""
        for container, late in list(self._unsettled.items()):
            if now < late.retry_at:
                continue
            log = self.log.bind(job_id=late.job.job_id)
            if self.heartbeat.current(container) is None:  # lost meanwhile: its lease ran out (the disk refused renewals too), or taken
                del self._unsettled[container]
                lapsed_on = self.heartbeat.lapsed_on(container)
                self.heartbeat.drop(container)
                if lapsed_on:
                    self._lapse(late.job, lapsed_on, log)
                else:
                    log.warning("claim_lost_before_settling", outcome=late.outcome)
                continue
            try:
                self._settle_claim(late.job, late.outcome, late.error, log)
            except FileNotFoundError:
                pass  # the container is gone: nothing is left to settle
            except OSError as exc:
                late.delay = min(late.delay * 2, HOLD_RETRY_MAX_SECONDS)
                late.retry_at = now + late.delay
                log.warning("claim_not_settled", outcome=late.outcome, error=describe_os_error(exc), retry_in_seconds=late.delay)
                continue
            del self._unsettled[container]
            self.heartbeat.drop(container)
            log.info("claim_settled", outcome=late.outcome)
        for container, (job, fault) in list(self._lapsed.items()):
            assert job.claim is not None
            try:
                released = release(job, held=f"lease_lapsed: its renewals failed on a disk fault ({fault})"[:500], retry_seconds=0.0)
            except FileNotFoundError:
                released = False  # the container is gone
            except OSError:
                continue  # still refused: the next tick tries again
            del self._lapsed[container]
            self.log.info("lapsed_claim_recorded", job_id=job.job_id, released=released,
                          note="held, to be taken over without a crash counted" if released else "another daemon had taken it over")

    def _renew_fault(self, fault: str) -> None:
        """Heartbeat thread: a renewal failed on a disk fault; the loop probes the folders (and
        pauses claiming while one fails)."""
        self._probe_due = True
        self.waker.event.set()

    def _claim_lost(self, job: ClaimedJob) -> None:
        """Heartbeat thread: another daemon owns the job now. Its fence is shut (the engine
        stops at its next write or denoising step and writes nothing more)."""
        self.metrics.claims_lost.inc()
        self.log.error("claim_lost", job_id=job.job_id, generation=job.generation)

    # ---- engine events (worker thread) -------------------------------------------------

    def _observe(self, event: str, fields: dict[str, Any]) -> None:
        """Engine audit/progress events -> metrics, and the few worth a daemon log line."""
        try:
            self.metrics.observe(event, fields)
            job_id = getattr(self._job_id, "value", None)
            if event == "stage_started":
                self.log.info("stage_started", job_id=job_id, stage=fields.get("stage"))
            elif event == "job_resumed":
                self.log.info("job_resuming", job_id=job_id, completed_stages=fields.get("completed_stages"))
            elif event == "train_checkpoint":
                self.log.info("train_checkpoint", job_id=job_id, step=fields.get("step"))
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
