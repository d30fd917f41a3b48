"""Where a claimed job runs: in this process (`local`, the default) or on a Ray cluster's GPU
workers (`ray`, [daemon] backend = "ray" and [daemon.ray]; the optional extra `pip install .[ray]`).

The daemon keeps its place with either: it watches, validates readiness, claims (the rename),
holds and renews the claim, settles it and publishes metrics. A backend only runs one attempt
of a job: `run_job(job, fence, ...)` returns the engine's JobResult, or raises AttemptLost when
the attempt was lost with its worker (node death, a killed raylet, a cut network). The daemon
then takes the claim's next generation (claim.next_attempt: counted as a crash) and calls
`run_job` again, so that every attempt runs under a generation of its own; the lost attempt, if
its process still runs somewhere (an orphan: seen on this host, a worker whose raylet was
SIGKILLed committed one more stage), finds the later generation at its next write
(claim.GenerationFence) and writes nothing more. Ray's own task retries are therefore off
(max_retries=0, max_restarts=0): a retry must take its generation before it starts, which only
the claim's holder can do.

With Ray, each worker slot is one Ray actor declaring [daemon.ray] gpus_per_job GPUs (Ray sets
CUDA_VISIBLE_DEVICES for it). With keep_models_loaded (the default) the actor lives as long as
the daemon and keeps its Engine, and with it the loaded models, across jobs; otherwise a new
actor (a new process: every model loaded again) is made for each attempt and killed after it.
Workers run the same engine on the same shared storage (the work area, outbox, failed/ and the
models folder must be the same paths on every node) and resume from the job's ledger.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon.claim import ClaimedJob, GenerationFence, worker_path
from daemon.settings import DaemonSettings, RaySettings
from engine import ConfigError, Engine, JobOutcome, JobResult
from engine.jobfolder import atomic_write_json, safe_subject_name, set_umask

WAIT_SECONDS = 1.0  # how often a job's thread looks up from waiting for its attempt (stop requests)
PROBE_SECONDS = 30.0  # a kept worker must answer this soon before it is given a job (else it is replaced)
START_RETRY_SECONDS = 30.0  # a kept worker that failed to start (a model missing on its node) is started again this much later
STOP_GRACE_SECONDS = 5.0  # on a stop, an attempt that has not begun by then is not waited for
CONNECT_LOOK_SECONDS = 0.2  # how often the wait for ray.init looks up (stop requests, the connect deadline)

log = structlog.get_logger("daemon.cluster")


class AttemptLost(Exception):
    """The attempt's worker is gone or unreachable; the attempt may still be running (fenced)."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(f"the attempt on node {node} was lost: {why}")
        self.node, self.why = node, why


class Backend(Protocol):
    name: str

    def start(self) -> None: ...
    def capacity(self) -> int: ...  # how many jobs may run at once now
    # One attempt; returns the engine's result and the node that ran it. Raises AttemptLost.
    def run_job(self, job: ClaimedJob, fence: Any, *, outbox: Path, failed: Path, origin: Path) -> tuple[JobResult, str]: ...
    def stop_jobs(self) -> None: ...  # the jobs in flight stop at their next safe point, resumable
    def resume_jobs(self) -> None: ...  # clear a stop (an installation error stops the daemon; a job's end does not)
    def close(self) -> None: ...


class LocalBackend:
    """One job at a time in this process, with the daemon's own engine (and its loaded models)."""

    name = "local"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.node = socket.gethostname()

    def start(self) -> None:
        return None

    def capacity(self) -> int:
        return 1

    def run_job(self, job: ClaimedJob, fence: Any, *, outbox: Path, failed: Path, origin: Path) -> tuple[JobResult, str]:
        result = self.engine.run_job(job.folder, outbox, job_id=job.job_id, failed_dir=failed, fence=fence, refresh_inputs=False, origin=origin)
        return result, self.node

    def stop_jobs(self) -> None:
        self.engine.stop_requested.set()

    def resume_jobs(self) -> None:
        self.engine.stop_requested.clear()

    def close(self) -> None:
        return None


class JobWorker:
    """The body of one Ray actor: an Engine on a GPU node, kept across jobs (its models stay loaded)."""

    def __init__(self, settings: Any, demo: bool, umask: str, daemon_id: str, log_level: str) -> None:
        from engine import configure_json_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        configure_json_logging(log_level, sys.stdout, extra=lambda _l, _m, event: {**event, "daemon_id": daemon_id, "worker_pid": os.getpid()})
        if umask:
            set_umask(int(umask, 8))
        started = time.monotonic()
        self.engine = Engine(settings, demo=demo)
        self.engine_seconds = time.monotonic() - started
        self.jobs = 0

    def describe(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "pid": os.getpid(), "gpus": context.get_accelerator_ids().get("GPU", []), "engine_seconds": round(self.engine_seconds, 3),
                "jobs": self.jobs}

    def run(self, folder: str, outbox: str, failed: str, job_id: str, origin: str, container: str,
            generation: int) -> tuple[JobResult, dict[str, Any]]:
        """One attempt at a job, under claim generation `generation` (the daemon took it for this
        attempt); returns the result and this worker's description."""
        fence = GenerationFence(Path(container), generation)
        described = self.describe()
        fence.check("record which worker runs this attempt")
        atomic_write_json(worker_path(Path(container), generation), {**described, "generation": generation, "started": time.time()})
        self.engine.stop_requested.clear()
        self.jobs += 1
        result = self.engine.run_job(Path(folder), Path(outbox), job_id=job_id, failed_dir=Path(failed), fence=fence, refresh_inputs=False,
                                     origin=Path(origin))
        return result, described

    def stop(self) -> None:
        self.engine.stop_requested.set()


@dataclass
class _Slot:
    """One job at a time on one worker (a Ray actor and the GPUs it declared)."""

    index: int
    actor: Any = None
    ready: Any = None  # the ref of its describe() while it starts; None once it answered
    info: dict[str, Any] | None = None  # describe()'s answer: node, pid, how long the engine took to load
    job: Path | None = None  # the container of the job it runs
    retry_at: float = 0.0  # kept worker that failed to start: started again from then (monotonic)


class RayBackend:
    """Jobs on a Ray cluster: one job per worker slot at once, as many slots as [daemon.ray]
    workers (0: the cluster's GPUs / gpus_per_job when the daemon starts)."""

    name = "ray"

    def __init__(self, settings: Any, daemon: DaemonSettings, *, demo: bool, daemon_id: str, log_level: str = "info") -> None:
        self.settings, self.config, self.demo = settings, daemon.ray, demo
        self.umask, self.daemon_id, self.log_level = daemon.umask, daemon_id, log_level
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started_ray = False
        self._temp_dir: str | None = None  # the private cluster's (address = "local")
        self._closed = threading.Event()  # set by close(): the thread that ran ray.init ends (see _init)
        self._actor_class: Any = None

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Join the cluster [daemon.ray] address names (or start the private one of "local"); returns
        without one when the daemon is asked to stop meanwhile (the caller looks at its stop)."""
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # air-gapped: no usage reports
        config: RaySettings = self.config
        if not ray.is_initialized():
            options: dict[str, Any] = {"namespace": config.namespace, "log_to_driver": False, "configure_logging": False}
            if config.address == "local":
                options.update(self._private_cluster())
            else:
                options["address"] = config.address
            if not self._init(options):
                return
            self._started_ray = True
        resources = ray.cluster_resources()
        count = config.workers or self._fits(resources)
        if count < 1:
            raise ConfigError("ray_no_gpus", f"the Ray cluster at {config.address!r} declares {resources.get('GPU', 0):g} GPU(s) and "
                                             f"{resources.get('CPU', 0):g} CPU(s); a job needs [daemon.ray] gpus_per_job = "
                                             f"{config.gpus_per_job:g} and cpus_per_job = {config.cpus_per_job:g}: start the GPU boxes "
                                             "with `ray start --address HEAD:6379 --num-gpus N`, or set [daemon.ray] workers")
        self._actor_class = ray.remote(JobWorker).options(num_gpus=config.gpus_per_job, num_cpus=config.cpus_per_job, max_restarts=0,
                                                          max_task_retries=0, max_concurrency=2)  # run() and stop() at once
        self._slots = [_Slot(index) for index in range(count)]
        if config.keep_models_loaded:
            for slot in self._slots:
                self._new_actor(slot)
        log.info("ray_backend_started", address=config.address, gcs_address=ray.get_runtime_context().gcs_address, workers=count,
                 keep_models_loaded=config.keep_models_loaded, cluster_gpus=resources.get("GPU", 0),
                 nodes=len([node for node in ray.nodes() if node.get("Alive")]), temp_dir=self._temp_dir)

    def _private_cluster(self) -> dict[str, Any]:
        """ray.init's options for the private one-node cluster of address = "local".

        What ray.init does (Ray 2.60, ray/_private/worker.py init and
        services.canonicalize_bootstrap_address): with no address, or "auto", it takes RAY_ADDRESS if
        set, else the cluster that the last `ray start` wrote to <temp>/ray/ray_current_cluster, and
        joins it (only "auto" fails when there is none); RAY_ADDRESS never replaces any other address.
        address="local" starts a new cluster whatever RAY_ADDRESS and ray_current_cluster say. Its
        processes (raylet, workers) inherit this process's environment, RAY_ADDRESS with it: that goes
        (logged), so that nothing in them is pointed at another cluster. ray.init writes no
        ray_current_cluster (only `ray start` does), but it points <temp>/ray/session_latest at its
        own session, where a user's `ray` tools look for their own cluster's logs: the private
        cluster gets a temp dir of its own, removed when the daemon closes. Its Unix sockets lie
        under it (<dir>/session_<date>_<time>_<pid>/sockets/plasma_store.N, ~65 bytes more) and must
        fit in 107 bytes: a short folder in the system's temp dir, as Ray's own default is.

        Ray 2.60 turns token authentication on for a cluster ray.init starts (RAY_AUTH_MODE=token
        unless set) and, finding no token, writes a new one to ~/.ray/auth_token. That file then
        turns it on for every later `ray start --head` of the same user, whose other nodes (`ray
        start --address`, without the token) are refused (seen). A token of the private
        cluster's own in RAY_AUTH_TOKEN (read before any file; inherited by its processes) keeps
        it authenticated and leaves ~/.ray alone."""
        ignored = os.environ.pop("RAY_ADDRESS", None)
        if ignored:
            log.info("ray_address_ignored", ray_address=ignored, reason='[daemon.ray] address = "local": a private cluster')
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self._temp_dir = tempfile.mkdtemp(prefix="idrep-ray-", dir=os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
        return {"address": "local", "include_dashboard": False, "_temp_dir": self._temp_dir}

    def _init(self, options: dict[str, Any]) -> bool:
        """ray.init in a thread of its own, waited for until the daemon is asked to stop or, for a
        cluster named by address, [daemon.ray] connect_timeout_seconds have passed (ConfigError
        ray_unreachable naming the address). False when stopped meanwhile.

        Why a thread: Ray's connect to an address that does not answer retries for about 12
        minutes (Ray 2.60, ray/_private/node.py _init_gcs_client: 20 tries, each a 5 s connect and
        a 30 s wait for the cluster id) and cannot be interrupted. Its knobs are no deadline:
        RAY_gcs_server_port_wait_time_s counts tries (one still takes ~35 s), and the per-try
        waits (RAY_py_gcs_connect_timeout_s, RAY_gcs_rpc_server_connect_timeout_s) are process-wide
        settings of every GCS client, not of this connect alone. An attempt given up on goes on in
        its daemon thread until Ray itself gives up (the daemon's process exits without waiting
        for it); one that succeeds late is shut down at once. Off the main thread ray.init also
        leaves the daemon's SIGTERM handler alone (on the main thread it installs sys.exit(15)).

        The thread lives until close(): the processes of a cluster ray.init starts (address =
        "local") are killed when the thread that started them ends (Ray sets PR_SET_PDEATHSIG,
        which Linux ties to the forking thread; seen: a private cluster started by a thread that
        then returned was gone, and the driver aborted a minute later)."""
        import ray

        address = str(options["address"])
        where = f"{address!r} (RAY_ADDRESS={os.environ['RAY_ADDRESS']})" if address == "auto" and os.environ.get("RAY_ADDRESS") else repr(address)
        timeout = None if address == "local" else self.config.connect_timeout_seconds
        lock = threading.Lock()
        state: dict[str, Any] = {"done": False, "abandoned": False, "error": None}
        temp_dir = self._temp_dir

        def own_the_cluster() -> None:
            try:
                ray.init(**options)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                state["error"] = exc
            with lock:
                state["done"] = True
                abandoned = state["abandoned"]
            if abandoned:
                if state["error"] is None:
                    ray.shutdown()
                if temp_dir:
                    shutil.rmtree(temp_dir, ignore_errors=True)
            elif state["error"] is None:
                self._closed.wait()

        log.info("ray_connecting", address=address, timeout_seconds=timeout)
        thread = threading.Thread(target=own_the_cluster, name="ray-init", daemon=True)
        thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with lock:
                if state["done"]:
                    break
                stopped, late = self._stopping.is_set(), deadline is not None and time.monotonic() >= deadline
                if stopped or late:
                    state["abandoned"] = True
                    self._temp_dir = None
            if stopped:
                log.info("ray_connect_abandoned", address=address, reason="stop requested")
                return False
            if late:
                raise ConfigError("ray_unreachable", f"[daemon.ray] address = {where}: no Ray cluster answered within {timeout:g} s "
                                                     "([daemon.ray] connect_timeout_seconds); start its head with `ray start --head` (and "
                                                     "each GPU box with `ray start --address HEAD:6379 --num-gpus N`), or set address")
            thread.join(CONNECT_LOOK_SECONDS)
        error = state["error"]
        if isinstance(error, (ConnectionError, RuntimeError, ValueError)):
            raise ConfigError("ray_unreachable", f"[daemon.ray] address = {where}: no Ray cluster answered ({error}); start its head with "
                                                 "`ray start --head` (and each GPU box with `ray start --address HEAD:6379 --num-gpus N`), "
                                                 "or set address") from None
        if error is not None:
            raise error
        return True

    def _fits(self, resources: dict[str, float]) -> int:
        fits = []
        for need, have in ((self.config.gpus_per_job, resources.get("GPU", 0.0)), (self.config.cpus_per_job, resources.get("CPU", 0.0))):
            if need > 0:
                fits.append(math.floor(have / need + 1e-9))
        return min(fits) if fits else 1

    def close(self) -> None:
        import ray

        for slot in self._slots:
            self._kill(slot)
        if self._started_ray:
            ray.shutdown()
        self._closed.set()  # the thread that started the cluster may end now
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # ---- slots --------------------------------------------------------------------------

    def _new_actor(self, slot: _Slot) -> None:
        slot.actor = self._actor_class.remote(self.settings, self.demo, self.umask, self.daemon_id, self.log_level)
        slot.ready, slot.info = slot.actor.describe.remote(), None

    def _kill(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead, or its node unreachable: it is fenced either way
                pass
        slot.actor = slot.ready = slot.info = None

    def _look(self, slot: _Slot) -> bool:
        """Has the slot's actor answered (models loaded, ready for a job)? One that failed to start
        (its node lacks a staged model, say: the error names it) is started again after a pause."""
        import ray

        if not self.config.keep_models_loaded:
            return True
        if slot.actor is None:
            if time.monotonic() >= slot.retry_at:
                self._new_actor(slot)
            return False
        if slot.ready is None:
            return True
        done, _ = ray.wait([slot.ready], timeout=0)
        if not done:
            return False
        try:
            slot.info = ray.get(slot.ready)
        except ray.exceptions.RayError as exc:
            log.error("ray_worker_not_started", slot=slot.index, error=str(exc)[-1500:], retry_seconds=START_RETRY_SECONDS)
            self._kill(slot)
            slot.retry_at = time.monotonic() + START_RETRY_SECONDS
            return False
        slot.ready = None
        log.info("ray_worker_ready", slot=slot.index, **(slot.info or {}))
        return True

    def capacity(self) -> int:
        with self._lock:
            return sum(1 for slot in self._slots if slot.job is not None or self._look(slot))

    def _acquire(self, job: ClaimedJob) -> _Slot | None:
        """A free worker for the job's attempt, probed first: a kept worker whose node died while
        it was idle is replaced here, so that the job is not charged a crash it never had."""
        import ray

        while not self._stopping.is_set():
            with self._lock:
                slot = next((slot for slot in self._slots if slot.job is None and self._look(slot)), None)
                if slot is not None:
                    slot.job = job.container
            if slot is None:
                self._stopping.wait(WAIT_SECONDS)
                continue
            if slot.actor is None:  # a worker per attempt (keep_models_loaded = false): made for it in run_job
                return slot
            try:
                slot.info = ray.get(slot.actor.describe.remote(), timeout=PROBE_SECONDS)
                return slot
            except (ray.exceptions.RayError, TimeoutError) as exc:  # GetTimeoutError is both
                log.warning("ray_worker_lost_while_idle", slot=slot.index, node=(slot.info or {}).get("node"), error=str(exc)[:300])
                with self._lock:
                    self._kill(slot)
                    self._new_actor(slot)
                    slot.job = None
        return None

    # ---- one attempt ----------------------------------------------------------------------

    def run_job(self, job: ClaimedJob, fence: Any, *, outbox: Path, failed: Path, origin: Path) -> tuple[JobResult, str]:
        import ray

        assert job.claim is not None
        slot = self._acquire(job)
        if slot is None:  # stopping before a worker was free: the job stays claimed, resumable
            return JobResult(job.job_id, safe_subject_name(job.claim.folder), JobOutcome.INTERRUPTED, job.folder), ""
        try:
            if slot.actor is None:  # a worker per attempt (keep_models_loaded = false)
                self._new_actor(slot)
            actor = slot.actor
            ref = actor.run.remote(str(job.folder), str(outbox), str(failed), job.job_id, str(origin), str(job.container), job.generation)
            stop_seen: float | None = None
            while True:
                done, _ = ray.wait([ref], timeout=WAIT_SECONDS)
                if done:
                    break
                if self._stopping.is_set():
                    actor.stop.remote()  # again each time: a stop sent before run() began is forgotten by it
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen > STOP_GRACE_SECONDS and not worker_path(job.container, job.generation).exists():
                        # The attempt never began (its worker waits for a GPU that no node has free):
                        # nothing to wait for; the job stays claimed, resumable.
                        self._kill(slot)
                        if self.config.keep_models_loaded:
                            self._new_actor(slot)
                        return JobResult(job.job_id, safe_subject_name(job.claim.folder), JobOutcome.INTERRUPTED, job.folder), ""
            try:
                result, worker = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError) as exc:
                node = str((slot.info or {}).get("node", "")) or "unknown"
                self._kill(slot)
                if self.config.keep_models_loaded:
                    self._new_actor(slot)  # on whichever node has the GPUs free, when one has
                raise AttemptLost(node, f"{type(exc).__name__}: {str(exc)[:300]}") from None
            return result, str(worker.get("node", ""))
        finally:
            with self._lock:
                slot.job = None
            if not self.config.keep_models_loaded:
                self._kill(slot)

    def stop_jobs(self) -> None:
        self._stopping.set()

    def resume_jobs(self) -> None:
        self._stopping.clear()


def make_backend(name: str, engine: Engine, settings: Any, daemon: DaemonSettings, *, demo: bool, daemon_id: str) -> Backend:
    if name == "local":
        return LocalBackend(engine)
    try:
        import ray  # noqa: F401 - the optional extra
    except ImportError:
        raise ConfigError("ray_missing", '[daemon] backend = "ray" (or --backend ray) needs Ray on this host and every worker: '
                                         "pip install '.[ray]' (the same Ray and Python version everywhere)") from None
    return RayBackend(settings, daemon, demo=demo, daemon_id=daemon_id)
