"""Per-job overhead of the daemon (finding, claiming, settling, metrics, logs) as a share of a job's wall time.

    python bench/bench_daemon.py [--jobs 8] [--job fast|example] [--threads 1]

Method. One process, one `engine.Engine` (models loaded once, as in the daemon), the tiny demo
model and the embedded face models, jobs made of scikit-image's astronaut. Each round runs one
job two ways, alternating which goes first, so that load from other processes falls on both:

  direct   Engine.run_job(folder, outbox), the library call that `python -m engine run` makes
           (without the CLI's progress printer: observer None).
  daemon   the daemon's own code path for one job, driven by hand instead of by its loop:
           the folder is dropped into a real daemon.service.Service's inbox with a READY marker,
           then Service.readiness.touch (what a watch event triggers), Service._start_next
           (confirm the folder, claim_folder: container, claim file, rename; the job_claimed
           log line; _begin: heartbeat hold, gauges, a worker thread), and the worker's
           Service._run_job (published check, Engine.run_job with the service's observer
           turning engine events into Prometheus metrics and log lines, the claimed folder
           compared by hash with the published inputs/, _settle: discard the claimed folder,
           job_ended metrics and log line), joined.

Every step of the daemon path is timed where it runs (a wrapper around the named function:
wall seconds and the calling thread's CPU seconds, exclusive of the steps timed inside it).
The daemon's overhead is the sum of its steps, and `unattributed` is what remains of the
daemon path's wall time outside Engine.run_job and those steps (thread start and join).
This is the honest number: the steps cost milliseconds, while two runs of the same job differ
by far more than that on a shared machine, so the plain difference "daemon minus direct" is
printed too, but only to show that it is noise of that size.

Also counted per job, though they run beside the job and not in it: the claim heartbeat (one
lease renewal every lease_seconds / 3; one renewal is timed and multiplied by the renewals a job
of this length gets) and the daemon loop's ticks and full scans while the job runs (one tick
body and one scan, with one more folder still being copied into the inbox, are timed and
multiplied the same way; the loop sleeps between ticks). A Prometheus scrape (serialising the
registry) is timed once; scrapes come per scrape interval, not per job.

The daemon runs each job in a fresh thread, while Engine() applied models.cpu_threads
(torch.set_num_threads) in the main thread. OpenMP keeps the thread count per thread: a fresh
thread starts from the runtime's default (all cores) until ATen's lazy per-thread set-up runs
(any torch.get_num_threads() or large parallel op does it); MKL matrix products called before
that use every core. That cost would not appear in any step above, so the script reads
omp_get_max_threads() of the engine's thread (through ctypes, which does not trigger the set-up)
at the start of every stage and at the first train step, seed and render of every daemon-path
job, and prints the values; and it times 40 matrix products in the main thread, in a fresh thread,
and in a fresh thread after torch.set_num_threads, to show what is at stake.

Not counted, because it is waiting chosen in config.toml and not work: the time before a
folder is claimed (none with a READY marker and native watch events, as here; stable_seconds
without the marker; up to poll_seconds on a network share). Nor are process start and model
loading, which the daemon pays once and `python -m engine run` pays for every job; the first
untimed jobs and Engine() are printed for that comparison.

The engine's own bookkeeping (ledger state.json writes, hash-chained audit lines with an fsync
each, the audit header's facts, stage-artifact hashes, the manifest, report.html) runs in both
paths: it is not the daemon's, but the same steps are timed the same way and printed as a share
of the engine's wall time, so that the whole cost of being forensic is on one page.

Logs: both paths log JSON lines through structlog as the daemon configures it, written to
/dev/null (a terminal or journald costs more per line). --job fast is the end-to-end tests'
job (tests/harness/lab.py FAST_JOB: 64-px prepare, 1 training step, 1 seed, 2 render steps),
the shortest real job and so the largest share; --job example is engine.example's job (256 px,
up to 300 steps, 8 seeds, two renders): about a minute per job on the 2-core VM, so `--jobs 2`
(six jobs with the untimed ones) runs about 7 minutes.

A benchmark, not a test: it asserts nothing except that every job finished.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import load_average  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import structlog  # noqa: E402

from tests.harness.lab import FAST_JOB  # noqa: E402 - the daemon tests' fast job: the same job, measured

DAEMON_STEPS = ("readiness.touch", "Service._start_next", "readiness.confirm", "claim_folder", "Service._run_job",
                "find_published", "inputs_changed", "Service._settle", "Service._observe")
ENGINE_STEPS = ("copy_verified", "Ledger.save", "AuditLog.event", "audit header facts", "hash_tree", "input_hashes", "write_manifest",
                "write_report")
STEP_NOTES = {
    "readiness.touch": "watch event: look at the new folder",
    "Service._start_next": "pick the folder, job_claimed log, start worker",
    "readiness.confirm": "re-list the folder before claiming",
    "claim_folder": "container, claim file (fsync, link), rename",
    "Service._run_job": "heartbeat, job_ended metrics + log line",
    "find_published": "look for this job id in outbox/ and failed/",
    "inputs_changed": "hash the claimed folder against the published inputs/",
    "Service._settle": "discard the claimed folder (rename, remove)",
    "Service._observe": "engine events -> metrics + log lines",
    "copy_verified": "copy the dropped folder to inputs/, verify by hash, fsync",
    "Ledger.save": "state.json, atomic + fsync",
    "AuditLog.event": "hash-chained line + fsync (observer excluded)",
    "audit header facts": "versions, model facts, device",
    "hash_tree": "sha256 of each stage's artifacts",
    "input_hashes": "sha256 of job.toml and photos",
    "write_manifest": "sha256 of every output + manifest",
    "write_report": "report.html",
}


class StepTimer:
    """Wall and thread-CPU seconds of named functions, exclusive of timed functions they call.

    `wrap(owner, attribute, label)` replaces owner.attribute with a timing wrapper (restored by
    `restore()`); an attribute that is not there (renamed since this was written) is listed in
    `missing` and printed, its step then shows 0. `bucket` selects which path's tally the calls go to."""

    def __init__(self) -> None:
        self.bucket = "none"
        # bucket -> label -> [exclusive wall, exclusive CPU, calls, inclusive wall, inclusive CPU]
        self.totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0, 0.0, 0.0]))
        self._local = threading.local()
        self._restore: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute, None)
        if original is None:
            self.missing.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attribute}")
            return
        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, self.timed(original, label))

    def timed(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            stack.append([0.0, 0.0])  # wall, CPU of timed calls inside this one
            wall_started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall_started, time.thread_time() - cpu_started
                inner_wall, inner_cpu = stack.pop()
                if stack:
                    stack[-1][0] += wall
                    stack[-1][1] += cpu
                tally = self.totals[self.bucket][label]
                tally[0] += wall - inner_wall
                tally[1] += cpu - inner_cpu
                tally[2] += 1
                tally[3] += wall
                tally[4] += cpu
        return wrapper

    def _stack(self) -> list[list[float]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def take(self, bucket: str) -> dict[str, list[float]]:
        return {label: list(values) for label, values in self.totals.pop(bucket, {}).items()}

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)
        self._restore.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="timed jobs of each path, alternating (after one untimed job of each)")
    parser.add_argument("--job", choices=("fast", "example"), default="fast", help="which job.toml (see the module docstring)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (config.toml models.cpu_threads)")
    args = parser.parse_args()

    configure_logging()
    logging.getLogger("insightface").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*estimate.*")  # scikit-image's tform.estimate deprecation, via norm_crop (FINDINGS)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its no-torchvision notice is not a result
    diffusers.utils.logging.set_verbosity_error()  # "No LoRA keys ... text_encoder" on every LoRA load is not a result
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as scratch:
        bench(args, Path(scratch))


def configure_logging() -> None:
    """daemon/__main__.py's JSON log lines, into /dev/null."""
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True, default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sink),
        cache_logger_on_first_use=True,
    )


def drop_job(folder: Path, job_toml: str, photo: bytes) -> Path:
    """A job folder as a careful lab writes it: photo, job.toml, READY."""
    folder.mkdir(parents=True)
    (folder / "photo.png").write_bytes(photo)
    (folder / "job.toml").write_text(job_toml, encoding="utf-8")
    (folder / "READY").write_bytes(b"")
    return folder


def bench(args: argparse.Namespace, root: Path) -> None:
    import torch
    from prometheus_client import generate_latest
    from skimage import data

    import daemon.service as service_module
    import engine.runner as runner_module
    from daemon.claim import claim_folder, discard, renew
    from daemon.service import DaemonSettings, Service
    from engine.provenance.audit import AuditLog
    from engine.config import Settings
    from engine.example import EXAMPLE_JOB
    from engine.images import png_bytes
    from engine.ledger import Ledger
    from engine.diffusion.models import demo_model_dir, make_demo_model
    from engine.jobfolder import new_job_id
    from engine.runner import Engine

    job_toml = FAST_JOB if args.job == "fast" else EXAMPLE_JOB
    photo = png_bytes(data.astronaut())
    models = root / "models"
    make_demo_model(demo_model_dir(models))
    settings = Settings.from_table({"paths": {"models": str(models)}, "models": {"cpu_threads": args.threads}}, root=root)
    config = DaemonSettings(inbox="inbox", outbox="outbox", work="work", stable_seconds=10.0, metrics_port=0, daemon_id="bench")
    service = Service(settings, config, demo=True)
    service.paths.prepare()
    load_started = time.perf_counter()
    engine = service.engine = Engine(settings, demo=True)
    engine_load = time.perf_counter() - load_started
    direct_inbox, direct_outbox = root / "direct-inbox", root / "direct-outbox"

    timer = StepTimer()
    timed_observer = timer.timed(service._observe, "Service._observe")
    omp_seen: dict[str, set[int]] = defaultdict(set)  # where in the job -> OpenMP threads the worker thread had there

    def daemon_observer(event: str, fields: dict[str, Any]) -> None:
        timed_observer(event, fields)
        if event == "stage_started":
            where = f"{fields.get('stage')} start"
        elif event in ("train_step", "seed_scored", "render_scored") and f"first {event}" not in seen_in_job:
            where = f"first {event}"
        else:
            return
        seen_in_job.add(where)
        omp_seen[where].add(omp_max_threads())

    seen_in_job: set[str] = set()
    timer.wrap(service.readiness, "touch", "readiness.touch")
    timer.wrap(service.readiness, "confirm", "readiness.confirm")
    timer.wrap(service, "_start_next", "Service._start_next")
    timer.wrap(service, "_run_job", "Service._run_job")
    timer.wrap(service_module, "find_published", "find_published")
    timer.wrap(service_module, "inputs_changed", "inputs_changed")
    timer.wrap(service, "_settle", "Service._settle")
    timer.wrap(service_module, "claim_folder", "claim_folder")
    timer.wrap(engine, "run_job", "Engine.run_job")
    timer.wrap(Ledger, "save", "Ledger.save")
    timer.wrap(AuditLog, "event", "AuditLog.event")
    for name in ("software_versions", "device_facts"):
        timer.wrap(runner_module, name, "audit header facts")
    timer.wrap(engine, "_model_facts", "audit header facts")
    for name in ("copy_verified", "hash_tree", "input_hashes", "write_manifest", "write_report"):
        timer.wrap(runner_module, name, name)

    def run_direct(index: int) -> tuple[float, float]:
        folder = drop_job(direct_inbox / f"job{index:03d}", job_toml, photo)
        engine.observer = None
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        result = engine.run_job(folder, direct_outbox)
        wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
        if result.outcome != "finished":
            raise SystemExit(f"direct job {index} ended {result.outcome}: {result.error}")
        shutil.rmtree(folder)
        shutil.rmtree(result.output_dir)
        return wall, cpu

    def run_daemon(index: int) -> tuple[float, float]:
        name = f"job{index:03d}"
        drop_job(service.paths.inbox / name, job_toml, photo)
        engine.observer = daemon_observer
        seen_in_job.clear()
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        service.readiness.touch(name, time.monotonic())
        service._start_next()
        worker = service._worker
        if worker is None:
            raise SystemExit(f"daemon did not claim {name}")
        worker.join()
        wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
        service._worker = None
        finished = list(service.paths.outbox.glob("*/*/manifest.json"))
        left = [p.name for p in service.paths.work.iterdir() if not p.name.startswith(".")]
        if len(finished) != 1 or left:
            raise SystemExit(f"daemon job {index} did not finish ({len(finished)} published, left in the work area: {left})")
        shutil.rmtree(finished[0].parent)
        return wall, cpu

    runs: dict[str, list[tuple[float, float]]] = {"direct": [], "daemon": []}
    steps: dict[str, list[dict[str, list[float]]]] = {"direct": [], "daemon": []}
    paths = {"direct": run_direct, "daemon": run_daemon}
    started = time.perf_counter()
    warm_up: dict[str, float] = {}
    for warm in ("direct", "daemon"):  # first jobs load the pipelines and pick kernels
        timer.bucket = "warm-up"
        warm_up[warm] = paths[warm](999 if warm == "direct" else 998)[0]
    timer.take("warm-up")
    for index in range(args.jobs):
        order = ("direct", "daemon") if index % 2 == 0 else ("daemon", "direct")
        for path in order:
            timer.bucket = path
            runs[path].append(paths[path](index))
            steps[path].append(timer.take(path))
    total = time.perf_counter() - started

    # Beside the job: heartbeat renewals, loop ticks and scans, a scrape.
    probe = drop_job(service.paths.inbox / "probe", job_toml, photo)
    held = claim_folder(probe, service.paths.work, new_job_id(), service.owner, config.lease_seconds)
    assert held is not None
    renew_wall = median_seconds(lambda: renew(held), 20)
    discard(held.container, service.paths.work)
    drop_job(service.paths.inbox / "copying", job_toml, photo).joinpath("READY").unlink()  # a folder still being copied
    service.readiness.scan(time.monotonic())

    def tick() -> None:
        now = time.monotonic()
        for name in service.waker.take():
            service.readiness.touch(name, now)
        service.readiness.refresh(now)
        ready, copying = service.readiness.counts()
        service.metrics.queue_depth.set(ready + len(service._takeovers) + len(service._recoveries))
        service.metrics.inbox_copying.set(copying)

    tick_wall = median_seconds(tick, 50)
    scan_wall = median_seconds(lambda: service._scan(time.monotonic()), 20)
    scrape_wall = median_seconds(lambda: generate_latest(service.metrics.registry), 20)
    timer.restore()
    threads = thread_effect()
    threads["not timed (not found)"] = timer.missing
    threads["main thread"] = {omp_max_threads()}
    threads.update(omp_seen)
    tick_seconds = max(0.05, min(0.5, config.stable_seconds / 4 or 0.5, config.scan_seconds))  # as Service._loop computes it

    report(args, runs, steps, total, torch.get_num_threads(), config, tick_seconds,
           {"renew": renew_wall, "tick": tick_wall, "scan": scan_wall, "scrape": scrape_wall}, engine_load, warm_up, threads)


def omp_max_threads() -> int:
    """omp_get_max_threads() of the calling thread, read from the OpenMP runtime torch loaded
    (through ctypes, so that reading it does not trigger ATen's per-thread initialisation); -1
    when there is none."""
    global _OMP
    if _OMP is None:
        import ctypes

        with open("/proc/self/maps", encoding="utf-8") as maps:
            found = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
        _OMP = ctypes.CDLL(found[0]) if found else False
    return int(_OMP.omp_get_max_threads()) if _OMP else -1


_OMP: Any = None


def thread_effect() -> dict[str, Any]:
    """CPU seconds of 40 float32 512 x 512 matmuls (MKL GEMM) in the main thread, in a fresh
    thread (as the daemon runs each job), and in a fresh thread that first calls
    torch.set_num_threads; medians of 5, alternating. The main thread called
    torch.set_num_threads (Engine does); a fresh thread's OpenMP runtime starts from its
    default (all cores) until ATen's lazy per-thread set-up runs."""
    import torch

    matrix = torch.randn(512, 512)
    samples: dict[str, list[float]] = {"main": [], "fresh": [], "fresh+set": []}

    def gemm(kind: str, reset: bool) -> None:
        if reset:
            torch.set_num_threads(torch.get_num_threads())
        started = time.process_time()
        for _ in range(40):
            matrix @ matrix
        samples[kind].append(time.process_time() - started)

    for _ in range(5):
        gemm("main", False)
        for kind, reset in (("fresh", False), ("fresh+set", True)):
            worker = threading.Thread(target=gemm, args=(kind, reset))
            worker.start()
            worker.join()
    return {"gemm": {kind: statistics.median(values) for kind, values in samples.items()}}


def median_seconds(call: Callable[[], Any], times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def report(args: argparse.Namespace, runs: dict[str, list[tuple[float, float]]], steps: dict[str, list[dict[str, list[float]]]],
           total: float, torch_threads: int, config: Any, tick_seconds: float, beside: dict[str, float],
           engine_load: float, warm_up: dict[str, float], threads: dict[str, Any]) -> None:
    def per_job(path: str, label: str, which: int) -> list[float]:
        return [job.get(label, [0.0, 0.0, 0, 0.0, 0.0])[which] for job in steps[path]]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    daemon_wall = [wall for wall, _ in runs["daemon"]]
    direct_wall = [wall for wall, _ in runs["direct"]]
    engine_inclusive = per_job("daemon", "Engine.run_job", 3)  # the engine's wall inside the daemon path, observer included
    daemon_sum_wall = [sum(job.get(label, [0.0])[0] for label in DAEMON_STEPS) for job in steps["daemon"]]
    daemon_sum_cpu = [sum(job.get(label, [0.0, 0.0])[1] for label in DAEMON_STEPS) for job in steps["daemon"]]
    outside_engine = [sum(job.get(label, [0.0])[0] for label in DAEMON_STEPS if label != "Service._observe") for job in steps["daemon"]]
    # Can be slightly negative: the worker thread may start running before _start_next returns.
    unattributed = [wall - engine - outside for wall, engine, outside in zip(daemon_wall, engine_inclusive, outside_engine)]
    job_wall = median(daemon_wall)
    renewals = job_wall / (config.lease_seconds / 3)
    ticks = job_wall / tick_seconds
    scans = job_wall / config.scan_seconds
    beside_seconds = renewals * beside["renew"] + ticks * beside["tick"] + scans * beside["scan"]

    print(f"bench_daemon: job {args.job!r}, torch threads {torch_threads}, load average {load_average()}")
    print(f"  {args.jobs} timed jobs per path, alternating (which goes first alternates), after 1 untimed job of each; {total:.1f} s in all")
    print(f"  {'path':<7} {'median wall s':>13} {'min wall s':>10} {'median CPU s':>12}   (per job; CPU = the whole process)")
    for path in ("direct", "daemon"):
        print(f"  {path:<7} {median([w for w, _ in runs[path]]):>13.3f} {min(w for w, _ in runs[path]):>10.3f} {median([c for _, c in runs[path]]):>12.3f}")
    print(f"  daemon - direct (medians): {median(daemon_wall) - median(direct_wall):+.3f} s wall, "
          f"{median([c for _, c in runs['daemon']]) - median([c for _, c in runs['direct']]):+.3f} s CPU  <- noise of that size; the steps below are the measurement")
    print()
    print(f"  daemon steps per job (medians over {args.jobs} jobs; exclusive of the steps inside them)")
    print(f"  {'step':<22} {'calls':>5} {'wall ms':>8} {'CPU ms':>7}  what")
    for label in DAEMON_STEPS:
        calls = median(per_job("daemon", label, 2))
        print(f"  {label:<22} {calls:>5.0f} {1000 * median(per_job('daemon', label, 0)):>8.2f} {1000 * median(per_job('daemon', label, 1)):>7.2f}  {STEP_NOTES[label]}")
    print(f"  {'unattributed':<22} {'':>5} {1000 * median(unattributed):>8.2f} {'':>7}  thread start/join (negative: worker and main thread overlap)")
    overhead = [s + max(0.0, u) for s, u in zip(daemon_sum_wall, unattributed)]
    print(f"  daemon overhead in the job's path: {1000 * median(overhead):.1f} ms wall ({1000 * median(daemon_sum_cpu):.1f} ms CPU) "
          f"of a {job_wall:.3f} s job = {100 * median([o / w for o, w in zip(overhead, daemon_wall)]):.2f} % of its wall time")
    print(f"  beside the job (estimated for a {job_wall:.2f} s job): {renewals:.2f} lease renewals x {1000 * beside['renew']:.2f} ms "
          f"(lease {config.lease_seconds:g} s), {ticks:.1f} loop ticks x {1000 * beside['tick']:.3f} ms (every {tick_seconds:g} s), "
          f"{scans:.2f} scans x {1000 * beside['scan']:.2f} ms (every {config.scan_seconds:g} s) = {1000 * beside_seconds:.1f} ms "
          f"= {100 * beside_seconds / job_wall:.2f} %")
    print(f"  one Prometheus scrape (serialise the registry): {1000 * beside['scrape']:.2f} ms, per scrape interval, not per job")
    gemm = threads.pop("gemm")
    missing = threads.pop("not timed (not found)")
    if missing:
        print(f"  NOT TIMED, not found in this version of the code: {', '.join(missing)}")
    print("  OpenMP threads of the thread running the engine (omp_get_max_threads, per point of the job, over every daemon-path job): "
          + ", ".join(f"{where} {sorted(values)}" for where, values in threads.items()))
    print(f"  torch in a fresh thread: 40 matmuls 512x512 take {gemm['main']:.3f} s CPU in the main thread, {gemm['fresh']:.3f} s in a fresh "
          f"thread ({gemm['fresh'] / gemm['main']:.2f}x), {gemm['fresh+set']:.3f} s in a fresh thread after torch.set_num_threads")
    print(f"  once per process, not per job: Engine() {engine_load:.2f} s (face models, model checks), first jobs (pipeline load, "
          f"first kernels) direct {warm_up['direct']:.2f} s, daemon {warm_up['daemon']:.2f} s. The CLI pays these for every job; "
          f"the daemon once.")
    print()
    engine_wall = median(engine_inclusive + per_job("direct", "Engine.run_job", 3))
    print(f"  engine bookkeeping per job, both paths (medians over {2 * args.jobs} jobs; engine median {engine_wall:.3f} s)")
    print(f"  {'step':<22} {'calls':>5} {'wall ms':>8} {'CPU ms':>7} {'share':>7}  what")
    bookkeeping_wall, bookkeeping_cpu = [], []
    all_jobs = steps["direct"] + steps["daemon"]
    for label in ENGINE_STEPS:
        walls = [job.get(label, [0.0])[0] for job in all_jobs]
        cpus = [job.get(label, [0.0, 0.0])[1] for job in all_jobs]
        calls = median([job.get(label, [0, 0, 0])[2] for job in all_jobs])
        print(f"  {label:<22} {calls:>5.0f} {1000 * median(walls):>8.2f} {1000 * median(cpus):>7.2f} {100 * median(walls) / engine_wall:>6.2f}%  {STEP_NOTES[label]}")
    for job in all_jobs:
        bookkeeping_wall.append(sum(job.get(label, [0.0])[0] for label in ENGINE_STEPS if label != "write_report"))
        bookkeeping_cpu.append(sum(job.get(label, [0.0, 0.0])[1] for label in ENGINE_STEPS if label != "write_report"))
    print(f"  ledger + audit + hashes + manifest (report.html not counted): {1000 * median(bookkeeping_wall):.1f} ms wall "
          f"({1000 * median(bookkeeping_cpu):.1f} ms CPU) = {100 * median(bookkeeping_wall) / engine_wall:.2f} % of the engine's wall time")



if __name__ == "__main__":
    main()
