"""The Ray backend: jobs per hour with 1 vs 2 worker nodes, and the model load a kept worker saves per job.

    python bench/bench_ray.py [--jobs 4] [--job fast|train]

Method. One process: a ray.cluster_utils.Cluster (a head with no resources, plus worker nodes
declaring one GPU and one CPU each; the demo model on the CPU, models.cpu_threads = 1 per
worker) and a real daemon.service.Service with [daemon] backend = "ray" in a thread, as in the
tests. Each arm drops `--jobs` job folders of scikit-image's astronaut at once (READY markers)
and times from the drop to the last `finished` job (`idrep_jobs_total`), claims and settling
included; before that, one untimed job per worker (a kept worker loads the diffusion model at its
first job and keeps it). The arms run in one process, one after another, on one cluster that grows:

  nodes=1 kept     one worker node; its worker (a Ray actor) keeps the engine and models loaded
  nodes=1 fresh    the same node, keep_models_loaded = false: a new worker process per job,
                   which loads the engine (face models) and the diffusion model again
  nodes=2 kept     a second node added; two workers run two jobs at once

Printed: seconds per arm, jobs per hour, the ratio 2 nodes / 1 node (kept), and the seconds per
job a kept worker saves (fresh minus kept, over the jobs). Each arm starts after its workers
answered (kept: their engines loaded): the daemon pays that once at start, not per job.

Caveat, printed with the figures: on a machine whose cores are fewer than the nodes' declared
CPUs the nodes share cores and the 2-node ratio is bounded by the cores, not by the backend;
each node here runs one torch thread, so 2 cores give at most 2x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import load_average  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _settings(root: Path, models: Path, address: str, keep: bool):
    from engine import Settings

    return Settings.from_table({"paths": {"models": str(models)}, "models": {"cpu_threads": 1},
                                "daemon": {"stable_seconds": 0.1, "scan_seconds": 0.2, "lease_seconds": 30.0, "metrics_port": 0,
                                           "daemon_id": "bench", "backend": "ray",
                                           "ray": {"address": address, "gpus_per_job": 1.0, "cpus_per_job": 1.0,
                                                   "keep_models_loaded": keep}}}, root=root)


def _arm(name: str, root: Path, models: Path, address: str, keep: bool, jobs: int, job_toml: str) -> float:
    from daemon.service import Service, load_daemon_settings
    from tests.harness.lab import drop_job

    root.mkdir(parents=True)
    settings = _settings(root, models, address, keep)
    service = Service(settings, load_daemon_settings(settings), demo=True)
    thread = threading.Thread(target=service.run, name="service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while service.backend is None or not service.metrics_port:
        assert thread.is_alive() and time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    while not service.backend._slots or service.backend.capacity() < len(service.backend._slots):  # noqa: SLF001
        assert time.monotonic() < deadline, "the workers did not start"  # (kept: their engines loaded)
        time.sleep(0.05)
    slots = len(service.backend._slots)  # noqa: SLF001

    def finished() -> float:
        return service.metrics.registry.get_sample_value("idrep_jobs_total", {"outcome": "finished"}) or 0.0

    # One untimed job per worker first: a kept worker loads the diffusion model at its first job
    # and keeps it, as in a daemon that has been up a while.
    for number in range(slots):
        drop_job(service.paths.inbox, f"warmup{number}", job_toml=job_toml)
    while finished() < slots:
        assert thread.is_alive() and time.monotonic() < deadline, f"{name}: the warm-up jobs did not finish"
        time.sleep(0.05)
    jobs += slots
    started = time.monotonic()
    for number in range(jobs - slots):
        drop_job(service.paths.inbox, f"subject{number}", job_toml=job_toml)
    while finished() < jobs:
        assert thread.is_alive() and time.monotonic() < deadline, f"{name}: the jobs did not finish"
        failed = service.metrics.registry.get_sample_value("idrep_jobs_total", {"outcome": "failed"}) or 0.0
        assert not failed, f"{name}: a job failed"
        time.sleep(0.05)
    seconds = time.monotonic() - started
    jobs -= slots
    service.request_stop("bench")
    thread.join(120)
    print(f"  {name:15s} {jobs} jobs in {seconds:7.1f} s   {jobs * 3600 / seconds:7.1f} jobs/h   {seconds / jobs:6.2f} s/job", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--job", choices=("fast", "train"), default="fast",
                        help="fast: tests/e2e's one-step job; train: tests' two-phase job (8 steps, two seeds, a render)")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from tests.harness.jobs import FAST_JOB
    from tests.harness.lab import FAST_JOB as E2E_JOB

    job_toml = E2E_JOB if args.job == "fast" else FAST_JOB
    print(f"bench_ray: {args.jobs} demo jobs per arm ({args.job}), ray {ray.__version__}, {os.cpu_count()} cores, load {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        models = work / "models"
        from engine.diffusion.models import demo_model_dir, make_demo_model

        make_demo_model(demo_model_dir(models))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1, num_gpus=1)
            cluster.wait_for_nodes()
            kept1 = _arm("nodes=1 kept", work / "a", models, cluster.address, True, args.jobs, job_toml)
            fresh1 = _arm("nodes=1 fresh", work / "b", models, cluster.address, False, args.jobs, job_toml)
            cluster.add_node(num_cpus=1, num_gpus=1)
            cluster.wait_for_nodes()
            kept2 = _arm("nodes=2 kept", work / "c", models, cluster.address, True, args.jobs, job_toml)
        finally:
            cluster.shutdown()
    print(f"jobs per hour, 2 nodes / 1 node (kept workers): x{kept1 / kept2:.2f}")
    print(f"a kept worker saves {(fresh1 - kept1) / args.jobs:.2f} s per job (model loads; fresh / kept x{fresh1 / kept1:.2f})")
    print(f"caveat: {os.cpu_count()} cores for 2 nodes of 1 torch thread each; the 2-node ratio is bounded by the cores here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
