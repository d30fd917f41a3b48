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

The /metrics server (`MetricsServer`) is an asyncio event loop in one daemon thread, so that
nothing that connects can make a scrape wait or the daemon's stop hang (it was wsgiref's server
on a pool of 4 threads: 150 connections that said half a request, or 4 that sent a byte every
2 s, held every thread; and its shutdown waited for them). A connection costs a few kilobytes,
never a thread. Each has METRICS_REQUEST_SECONDS from accept to the end of its request head,
whatever trickles in; at most METRICS_MAX_CONNECTIONS are open, a new one evicting the oldest
whose request is not complete (else the oldest); one request per connection (`Connection:
close`), its head at most METRICS_MAX_HEAD_BYTES. GET and HEAD of /metrics only; the body is
prometheus_client's (text format, or OpenMetrics when the Accept header asks for it; gzip when
accepted; `?name[]=` keeps only those metrics). `close()` drops every connection and waits for
no client.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import re
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from engine import JobOutcome
from engine.status import CONTROL_GROUP, LORA_GROUP, StageProgress, seed_group

# The daemon's own outcome: a run that ended without a clean stop (a bug, a kill); counted towards max_crashes.
CRASHED = "crashed"
# Every engine.JobOutcome a daemon's run can end in (not partial: it never stops at --until), and CRASHED.
OUTCOMES = tuple(o.value for o in JobOutcome if o != JobOutcome.PARTIAL) + (CRASHED,)
METRICS_MAX_CONNECTIONS = 64  # open at once; a new connection evicts the oldest whose request is not complete
METRICS_REQUEST_SECONDS = 5.0  # from accept to the end of the request head, whatever trickles in; then closed
METRICS_RESPONSE_SECONDS = 10.0  # to hand the response over and see the client hang up (one that reads nothing)
METRICS_MAX_HEAD_BYTES = 8192  # request line and headers; more: 431 and closed
# Connections the kernel holds until accepted (past it, a connect waits 1 s for its retry); also the
# most accepted in one go, so that open sockets stay below this + METRICS_MAX_CONNECTIONS.
METRICS_LISTEN_BACKLOG = 256
METRICS_CLOSE_SECONDS = 0.5  # close() waits at most this long for the server's thread
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
        self.inbox_unreadable = Gauge("idrep_inbox_unreadable", "Inbox folders this daemon cannot use, skipped while the rest go on: a "
                                      "folder it may not read, or one refused as input_unreadable (a file it may not open); "
                                      "`daemon status` and the inbox_folder_unreadable / job_refused log lines name them.", registry=r)
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
        self.claim_lapses = Counter("idrep_claim_lapses_total", "Claims whose lease ran out while this daemon ran their job because the work area "
                                    "refused the renewals (full, read-only, I/O errors): the job stopped, and is released on hold once "
                                    "the disk takes writes again; never counted as a crash.", registry=r)
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
        self._server: MetricsServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (one thread); returns the port (port 0: a free one).
        Raises OSError when it cannot listen on host:port."""
        self._server = MetricsServer(self.registry, host, port)
        return self._server.port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
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
            if stage in StageProgress.long_stages():
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
            group = seed_group(fields)
            if not fields.get("face_found", True) or fields.get("drift") is None:
                self.faces_not_found.labels(f"verify_{group}").inc()
            else:
                self.verify_drift.labels(group).observe(float(fields["drift"]))
                if group in (LORA_GROUP, CONTROL_GROUP):
                    self.seed_drift.labels(str(group == LORA_GROUP).lower()).observe(float(fields["drift"]))
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
        for stage in StageProgress.long_stages():
            self.progress_done.labels(stage).set(0)
            self.progress_planned.labels(stage).set(0)
        for sample in self.stage_in_progress.collect()[0].samples:
            self.stage_in_progress.labels(sample.labels["stage"]).set(0)


class MetricsServer:
    """GET and HEAD of /metrics over HTTP/1.1, one request per connection, on an asyncio event
    loop in one daemon thread. Nothing a client does holds a thread or the loop: every
    connection is closed at its deadline, or sooner when newer ones need its place."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        listening = _listening_socket(host, port)  # OSError here: nothing was started
        self.port = int(listening.getsockname()[1])
        # Every open connection, oldest first -> whether its request is complete (being answered).
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._loop = asyncio.new_event_loop()
        try:
            # Set up here, in the caller's thread, so that close() always finds a server to close.
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve_connection, sock=listening, limit=METRICS_MAX_HEAD_BYTES, backlog=METRICS_LISTEN_BACKLOG))
        except BaseException:
            listening.close()
            self._loop.close()
            raise
        self._thread = threading.Thread(target=self._run, name="metrics-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and drop every connection at once, answered or not; waits for no
        client, and at most METRICS_CLOSE_SECONDS for the server's thread."""
        try:
            self._loop.call_soon_threadsafe(self._stop)
        except RuntimeError:
            return  # the loop is closed already
        self._thread.join(METRICS_CLOSE_SECONDS)

    def _run(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            # Every connection was aborted: its task sees the end of its stream and returns (not
            # cancelled: asyncio 3.11 reports a cancelled connection task as an error).
            tasks = asyncio.all_tasks(self._loop)
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=METRICS_CLOSE_SECONDS))
            self._loop.close()

    def _stop(self) -> None:
        self._server.close()
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()
        self._loop.stop()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= METRICS_MAX_CONNECTIONS:
            self._evict()
        self._open[writer] = False
        answered = False
        try:
            try:
                async with asyncio.timeout(METRICS_REQUEST_SECONDS):
                    request = await _read_head(reader)
                response = self._answer(request) if request is not None else None
            except _Refused as refused:
                response = refused.response
            if response is None or writer not in self._open:
                return  # the client hung up, or was evicted, before its request was complete
            self._open[writer] = True
            writer.transport.set_write_buffer_limits(high=0)  # drain() returns once the kernel has it all
            writer.write(response)
            async with asyncio.timeout(METRICS_RESPONSE_SECONDS):
                await writer.drain()
                # Unread input makes the kernel reset the connection when it is closed, which may
                # destroy the response before the client reads it: say we are done, and read
                # until the client hangs up.
                writer.write_eof()
                while await reader.read(4096):
                    pass
            answered = True
        except (TimeoutError, OSError):
            pass  # past its deadline, reset by the client, or evicted: closed below
        finally:
            self._open.pop(writer, None)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    def _evict(self) -> None:
        """Make room for a new connection: drop the oldest whose request is not complete (a
        slow or silent client), else the oldest."""
        oldest = next((writer for writer, complete in self._open.items() if not complete), next(iter(self._open)))
        del self._open[oldest]
        oldest.transport.abort()

    def _answer(self, request: list[bytes]) -> bytes:
        """The whole response to a complete request head (request line first)."""
        parts = request[0].split(b" ")
        if len(parts) != 3 or not re.fullmatch(rb"HTTP/1\.[0-9]", parts[2]) or not parts[0].isalpha():
            return _response(HTTPStatus.BAD_REQUEST, b"400 Bad Request: not an HTTP/1.x request line\n")
        method, target = parts[0].decode("ascii"), parts[1].decode("latin-1")
        headers = {}
        for line in request[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return _response(HTTPStatus.BAD_REQUEST, b"400 Bad Request: a header line without a name\n")
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        url = urlsplit(target)
        if url.path != "/metrics":
            return _response(HTTPStatus.NOT_FOUND, b"404 Not Found: only /metrics is served here\n")
        if method not in ("GET", "HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"405 Method Not Allowed: use GET or HEAD\n", [("Allow", "GET, HEAD")])
        # Collected here, on the loop's thread: it takes milliseconds, and a collector that hung
        # (torch's CUDA state) holds up only the scrapes, not the daemon's stop or its exit, as
        # a worker thread of an executor would (they are joined when the interpreter exits).
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        registry: Any = self.registry
        names = parse_qs(url.query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        try:
            body = encoder(registry)
        except Exception:  # noqa: BLE001 - a collector's bug fails this scrape, not the server
            structlog.get_logger("daemon.metrics").exception("metrics_collect_failed")
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR, b"500 Internal Server Error: a collector failed (see the daemon's log)\n")
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        return _response(HTTPStatus.OK, body, extra, head_only=method == "HEAD")


class _Refused(Exception):
    """A request refused before its head was complete; `response` says why."""

    def __init__(self, response: bytes) -> None:
        super().__init__(response)
        self.response = response


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """The request line and header lines, without their line ends; None when the client hung
    up first. Raises _Refused (431) past METRICS_MAX_HEAD_BYTES."""
    too_large = _Refused(_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                   f"431 Request Header Fields Too Large: at most {METRICS_MAX_HEAD_BYTES} bytes\n".encode()))
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the reader's limit
            raise too_large from None
        size += len(line)
        if size > METRICS_MAX_HEAD_BYTES:
            raise too_large
        if not line.endswith(b"\n"):
            return None
        line = line.rstrip(b"\r\n")
        if line:
            lines.append(line)
        elif lines:
            return lines
        # An empty line before the request line is skipped (RFC 9112, 2.2).


def _response(status: HTTPStatus, body: bytes, headers: Iterable[tuple[str, str]] = (), *, head_only: bool = False) -> bytes:
    """Status line, headers and body; text/plain unless `headers` say otherwise. HEAD: the
    headers of the GET, no body."""
    fields = dict([("Content-Type", "text/plain; charset=utf-8"), *headers])
    fields.update({"Content-Length": str(len(body)), "Connection": "close"})
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one). An IPv4 address first where the
    name has both (as before: 127.0.0.1 for localhost); `::` also takes IPv4 where the system
    allows it. OSError when it cannot: a port in use, an address not of this host, a name that
    does not resolve."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = sorted(addresses, key=lambda info: info[0] != socket.AF_INET)[0]
    listening = socket.socket(family, kind, proto)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted daemon rebinds past TIME_WAIT
        listening.bind(address)
        listening.listen(METRICS_LISTEN_BACKLOG)
    except BaseException:
        listening.close()
        raise
    return listening
