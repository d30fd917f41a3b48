"""Prometheus metrics of one daemon, served on a local port.

Names follow Prometheus conventions: prefix `idrep_`, counters end in `_total`, durations
are `_seconds` histograms, sizes `_bytes`. Labels have few values (outcome, stage, phase,
render mode and pass, failure code); never a subject name or job id. Each `DaemonMetrics`
has its own CollectorRegistry, so several can live in one process (tests).

Most values come from the engine's observer events (`observe`), so the engine knows
nothing about Prometheus:
    stage_started {stage} / stage_finished {stage, seconds}     stage durations, stage in progress
    train_step {phase, step, loss} / train_checkpoint {step} / train_resumed {step, phase}  training
    seed_scored {lora, drift, face_found}                       verify drift, faces not found
    render_scored {pass_name, mode, drift, face_found}          render drift, faces not found
    (the same events, through engine.status.StageProgress)      work done / planned in the stage running
Job outcomes, queue depth and claims are set by the service.

The /metrics server answers from a small fixed pool of threads (METRICS_THREADS), with a
timeout on every connection: a scraper, or anything else that connects and says nothing, can
hold up at most that many threads, never one thread per connection.
"""

from __future__ import annotations

import math
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import JobOutcome
from engine.status import StageProgress

# The daemon's own outcome: a run that ended without a clean stop (a bug, a kill); counted towards max_crashes.
CRASHED = "crashed"
# Every engine.JobOutcome a daemon's run can end in (not partial: it never stops at --until), and CRASHED.
OUTCOMES = tuple(o.value for o in JobOutcome if o != JobOutcome.PARTIAL) + (CRASHED,)
METRICS_THREADS = 4  # requests answered at once; more wait in the listen backlog
METRICS_CONNECTION_TIMEOUT_SECONDS = 5.0  # a connection that sends no request for this long is closed
# Identity drift = 1 - cosine similarity, 0 (same face) .. 2; the lock threshold is 0.18.
DRIFT_BUCKETS = (0.05, 0.1, 0.15, 0.18, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0)
STAGE_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
COVERAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
TEXTURE_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 5.0)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class GpuMemoryCollector(Collector):
    """GPU memory of this process, read from torch only if the engine has already imported it
    and initialised CUDA: the daemon never imports torch itself (a scrape must not load it)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "idrep_gpu_memory_bytes",
            "GPU memory held by this process: allocated by tensors, reserved by the caching allocator (0 without CUDA).",
            labels=["kind"],
        )
        allocated = reserved = 0
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        except RuntimeError:
            pass  # CUDA in a bad state: the engine will report it; a scrape must not fail
        except AttributeError:
            pass  # torch half imported (the engine is loading it): no CUDA yet
        family.add_metric(["allocated"], allocated)
        family.add_metric(["reserved"], reserved)
        yield family


class DaemonMetrics:
    """Every metric of one daemon, on a private registry."""

    def __init__(self, daemon_id: str, *, stages: Iterable[str] = (), watch: str = "", demo: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Info("idrep_daemon", "This daemon: its id, how it watches the inbox, demo model or not.", registry=r)
        self.info.info({"daemon_id": daemon_id, "watch": watch, "demo": str(demo).lower()})
        self.jobs = Counter("idrep_jobs_total", "Runs of jobs this daemon ended, by outcome: finished, failed (refused or failed, see idrep_job_failures_total), held (the disk, share or permissions failed it: kept claimed, retried later), interrupted (stopped, resumable), lost (claim taken over), crashed.", ["outcome"], registry=r)
        self.job_holds = Counter("idrep_job_holds_total", "Runs of jobs held because the installation failed them, by code: disk_full, outbox_unwritable, io_error.", ["code"], registry=r)
        self.jobs_held = Gauge("idrep_jobs_held", "Claimed jobs on hold in the work area (waiting for their retry), at the last scan.", registry=r)
        self.ready = Gauge("idrep_ready", "1 while this daemon claims new jobs; 0 while it waits for models (idrep_models_missing) or pauses because a folder it writes failed its probe (see the claiming_paused log line).", registry=r)
        self.models_missing = Gauge("idrep_models_missing", "Models the configuration needs that are not staged (the models_missing log line names each and where it goes); no job is claimed while this is above 0.", registry=r)
        self.clock_skew = Gauge("idrep_clock_skew_seconds", "This host's wall clock minus the share's (the work area's file times); leases are judged on the share's clock.", registry=r)
        self.job_failures = Counter("idrep_job_failures_total", "Failed jobs by the engine's error code (no_face_found, invalid_job, ...).", ["code"], registry=r)
        self.job_duration = Histogram("idrep_job_duration_seconds", "Wall time of one run of a job by this daemon.", ["outcome"], buckets=JOB_BUCKETS, registry=r)
        self.stage_duration = Histogram("idrep_stage_duration_seconds", "Wall time of a stage that ran (skipped stages are not observed).", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_in_progress = Gauge("idrep_stage_in_progress", "1 for the stage running now.", ["stage"], registry=r)
        self.queue_depth = Gauge("idrep_queue_depth", "Jobs ready to run and waiting: complete inbox folders, and claims waiting to be taken over.", registry=r)
        self.inbox_copying = Gauge("idrep_inbox_copying", "Inbox folders still being copied (not yet ready).", registry=r)
        self.job_in_progress = Gauge("idrep_job_in_progress", "Jobs this daemon runs now (0 or 1 with the local backend; up to one per worker with Ray).", registry=r)
        self.jobs_by_node = Counter("idrep_backend_jobs_total", "Runs of jobs ended, by backend (local, ray), the node that ran the last attempt (its address; \"\" when none ran) and outcome.", ["backend", "node", "outcome"], registry=r)
        self.attempts_lost = Counter("idrep_attempts_lost_total", "Attempts lost with their worker (a cluster node died or was cut off) and run again under the claim's next generation, by backend.", ["backend"], registry=r)
        self.train_steps = Counter("idrep_train_steps_total", "Training steps done.", registry=r)
        self.train_checkpoints = Counter("idrep_train_checkpoints_total", "Training checkpoints written.", registry=r)
        self.train_step = Gauge("idrep_train_step", "Step of the job being trained (over all phases).", registry=r)
        self.train_loss = Gauge("idrep_train_loss", "Loss of the latest training step.", registry=r)
        self.train_phase = Gauge("idrep_train_phase", "1 for the training phase running now.", ["phase"], registry=r)
        self.progress_done = Gauge("idrep_stage_progress_done", "Work done in the stage running now: training steps, seed-discovery images (LoRA and control), render passes.", ["stage"], registry=r)
        self.progress_planned = Gauge("idrep_stage_progress_planned", "Work the stage running now plans, in the units of idrep_stage_progress_done; for training the job's step cap (phases may converge sooner).", ["stage"], registry=r)
        self.seed_drift = Histogram("idrep_seed_drift", "Identity drift of seed-discovery renders of the LoRA (lora=true) and the control (lora=false); every group: idrep_verify_drift.", ["lora"], buckets=DRIFT_BUCKETS, registry=r)
        self.verify_drift = Histogram("idrep_verify_drift", "Identity drift of seed-discovery renders per group: lora, faceid, lora+faceid, control ([identity] method and compare).", ["group"], buckets=DRIFT_BUCKETS, registry=r)
        self.render_drift = Histogram("idrep_render_drift", "Identity drift of final renders, per render mode and pass.", ["mode", "pass_name"], buckets=DRIFT_BUCKETS, registry=r)
        self.retouch_variants = Counter("idrep_retouch_variants_total", "Retouch variants made, by verdict: accepted or rejected (by [retouch.accept]).", ["outcome"], registry=r)
        self.retouch_drift = Histogram("idrep_retouch_drift", "Identity drift of retouch variants to their original photo.", buckets=DRIFT_BUCKETS, registry=r)
        self.retouch_texture = Histogram("idrep_retouch_texture_ratio", "Fine texture a retouch variant kept inside its masks (1 = all of it; plastic skin is well below).",
                                         buckets=TEXTURE_BUCKETS, registry=r)
        self.restores = Counter("idrep_restores_total", "Restorations by verdict: ok, flag (above a flag limit), refused_classical (the TELEA fill delivered instead); refused ones fail as restore_mask_too_large.", ["verdict"], registry=r)
        self.restore_coverage = Histogram("idrep_restore_face_coverage", "Share of the face a restoration's damage mask hides.", buckets=COVERAGE_BUCKETS, registry=r)
        self.faces_not_found = Counter("idrep_faces_not_found_total", "Generated images in which no face was found (never scored): verify_<group> (lora, control, faceid, lora+faceid), render, evaluate.", ["kind"], registry=r)
        self.evaluate_cells = Counter("idrep_evaluate_cells_total", "Evaluate grid cells (group x prompt x seed) rendered and scored, by whether a face was found.", ["face"], registry=r)
        self.evaluate_drift = Histogram("idrep_evaluate_drift", "Identity drift of evaluate grid cells with a face (every group, the control included).", buckets=DRIFT_BUCKETS, registry=r)
        self.claims_taken_over = Counter("idrep_claims_taken_over_total", "Claims this daemon took over: expired (a dead or frozen daemon's), released (a cleanly stopped one's), restart (its own, after a restart), held (a held job whose retry was due).", ["reason"], registry=r)
        self.claims_lost = Counter("idrep_claims_lost_total", "Claims another daemon took over from this one while it held them (this daemon was frozen past its lease).", registry=r)
        r.register(GpuMemoryCollector())
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
            self.job_duration.labels(outcome)
        for stage in stages:
            self.stage_duration.labels(stage)
            self.stage_in_progress.labels(stage).set(0)
        for reason in ("expired", "released", "restart", "held"):
            self.claims_taken_over.labels(reason)
        for code in ("disk_full", "outbox_unwritable", "io_error"):
            self.job_holds.labels(code)
        for verdict in ("accepted", "rejected"):
            self.retouch_variants.labels(verdict)
        for verdict in ("ok", "flag", "refused_classical"):
            self.restores.labels(verdict)
        for face in ("found", "not_found"):
            self.evaluate_cells.labels(face)
        self._phase = ""
        self.progress = StageProgress()
        self._server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (a thread, plus its bounded pool); returns the port (port 0: a free one)."""
        self._server = make_server(host, port, make_wsgi_app(self.registry), server_class=_PooledWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True).start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.pool.shutdown(wait=False, cancel_futures=True)
            self._server = None

    def job_ended(self, outcome: str, seconds: float, code: str | None = None) -> None:
        self.jobs.labels(outcome).inc()
        self.job_duration.labels(outcome).observe(seconds)
        if outcome == JobOutcome.FAILED:
            self.job_failures.labels(code or "unknown").inc()
        elif outcome == JobOutcome.HELD:
            self.job_holds.labels(code or "unknown").inc()
        self._clear_job_gauges()

    def job_ran(self, backend: str, node: str, outcome: str) -> None:
        self.jobs_by_node.labels(backend, node, outcome).inc()

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """The engine's observer events -> metrics (unknown events are ignored)."""
        if self.progress.update(event, fields) or event == "stage_started":
            stage = self.progress.stage
            if stage in StageProgress.LONG_STAGES:
                self.progress_done.labels(stage).set(self.progress.done)
                self.progress_planned.labels(stage).set(self.progress.total or 0)
        if event == "stage_started":
            self.stage_in_progress.labels(fields["stage"]).set(1)
        elif event == "stage_finished":
            self.stage_in_progress.labels(fields["stage"]).set(0)
            self.stage_duration.labels(fields["stage"]).observe(float(fields["seconds"]))
        elif event == "train_step":
            self.train_steps.inc()
            self.train_step.set(int(fields["step"]))
            loss = fields.get("loss")
            if loss is not None and math.isfinite(float(loss)):
                self.train_loss.set(float(loss))
            self._set_phase(str(fields.get("phase", "")))
        elif event == "train_checkpoint":
            self.train_checkpoints.inc()
        elif event == "train_resumed":
            self.train_step.set(int(fields["step"]))
            self._set_phase(str(fields.get("phase", "")))
        elif event == "seed_scored":
            group = str(fields.get("group") or ("lora" if fields.get("lora") else "control"))  # a record before [identity] has no group
            if not fields.get("face_found", True) or fields.get("drift") is None:
                self.faces_not_found.labels(f"verify_{group}").inc()
            else:
                self.verify_drift.labels(group).observe(float(fields["drift"]))
                if group in ("lora", "control"):
                    self.seed_drift.labels(str(group == "lora").lower()).observe(float(fields["drift"]))
        elif event == "render_scored":
            if not fields.get("face_found", True) or fields.get("drift") is None:
                self.faces_not_found.labels("render").inc()
            else:
                self.render_drift.labels(str(fields.get("mode", "")), str(fields.get("pass_name", ""))).observe(float(fields["drift"]))
        elif event == "restore_verdict":
            self.restores.labels(str(fields.get("verdict", ""))).inc()
            if fields.get("face_coverage") is not None:
                self.restore_coverage.observe(float(fields["face_coverage"]))
        elif event == "evaluate_cell":
            found = bool(fields.get("face_found")) and fields.get("drift") is not None
            self.evaluate_cells.labels("found" if found else "not_found").inc()
            if found:
                self.evaluate_drift.observe(float(fields["drift"]))
            else:
                self.faces_not_found.labels("evaluate").inc()
        elif event == "retouch_variant":
            self.retouch_variants.labels("accepted" if fields.get("accepted") else "rejected").inc()
            if fields.get("drift") is not None:
                self.retouch_drift.observe(float(fields["drift"]))
            if fields.get("texture_ratio") is not None:
                self.retouch_texture.observe(float(fields["texture_ratio"]))

    def _set_phase(self, phase: str) -> None:
        if phase == self._phase:
            return
        if self._phase:
            self.train_phase.labels(self._phase).set(0)
        if phase:
            self.train_phase.labels(phase).set(1)
        self._phase = phase

    def _clear_job_gauges(self) -> None:
        self._set_phase("")
        for stage in StageProgress.LONG_STAGES:
            self.progress_done.labels(stage).set(0)
            self.progress_planned.labels(stage).set(0)
        for sample in self.stage_in_progress.collect()[0].samples:
            self.stage_in_progress.labels(sample.labels["stage"]).set(0)


class _PooledWSGIServer(WSGIServer):
    """wsgiref's server with its requests handed to a fixed pool of threads (prometheus_client's
    own server starts one thread per connection, without bound)."""

    daemon_threads = True
    request_queue_size = 64  # connections waiting in the kernel while every thread is busy

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(max_workers=METRICS_THREADS, thread_name_prefix="metrics")
        # Accepting stops while every thread is busy: waiting connections stay in the kernel's
        # backlog, not in a queue of open sockets here.
        self._slots = threading.BoundedSemaphore(METRICS_THREADS)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(METRICS_CONNECTION_TIMEOUT_SECONDS)
        self._slots.acquire()
        self.pool.submit(self._handle, request, client_address)

    def _handle(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken or timed-out connection: drop it
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """No access log on stderr (the daemon's log is JSON on stdout)."""
