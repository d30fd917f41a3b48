"""The Ray backend on a real two-node Ray cluster in this process (ray.cluster_utils.Cluster: a
head and two worker nodes, each declaring one GPU; the demo model on the CPU). Each test drops a
job that trains in two phases and holds it at the first phase boundary (ENGINE_PAUSE_AT, in the
nodes' environment only), then breaks what it runs on:

  - its node is removed mid-train: the attempt is lost, run again on the other node under the
    claim's next generation, resumed from the ledger (prepare and embed skipped, training from
    its checkpoint), and the published job equals a clean run of the same job (the soak's
    comparator) and passes verify-audit;
  - its whole node is frozen (raylet and worker SIGSTOPped) until the cluster declares it dead;
    the retry finishes on the other node; then the frozen worker wakes: it finds the later
    generation at its first look and writes nothing more;
  - the daemon itself is SIGKILLed and started again: the job is submitted again and finishes once;
  - the daemon is stopped (SIGTERM): the worker stops at its next safe point, the claim is released;
  - max_retries = 0 and the node is lost: the job goes to failed/ as too_many_crashes with its inputs;
  - a kept worker whose node died while idle is replaced before it is given a job (no crash charged);
  - a stop does not wait for an attempt whose worker never got a GPU.

Skipped where Ray is not installed (`pip install .[ray]`; CI installs it)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from daemon.claim import find_claims, worker_record  # noqa: E402
from daemon.service import Service, load_daemon_settings  # noqa: E402
from daemon.status import daemon_status, format_daemon_status  # noqa: E402
from engine import Engine, Settings, verify_audit  # noqa: E402
from engine.fsutil import hash_tree  # noqa: E402
from engine.jobfolder import WORK_DIR  # noqa: E402
from tests.harness.jobs import FAST_JOB, folder_snapshot  # noqa: E402
from tests.harness.paths import REPO  # noqa: E402
from tests.harness.lab import Daemon, audit_events, drop_job, photo_bytes, write_config  # noqa: E402

PAUSE_AT = "train:phase_boundary:1"  # after the first phase's checkpoint: the retry resumes from it

# Nodes are declared dead after ~1.5 s without a health check answer (the default is ~30 s).
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500,
                      "health_check_initial_delay_ms": 0}


def _soak():
    spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_soak", module)  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class TwoNodes:
    """A head (no resources: the daemon's driver only) and two nodes of one GPU and one CPU each.
    The nodes' processes hold the job at PAUSE_AT (ENGINE_PAUSE_MODE=hold: until the marker goes)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False,
                                                                     "_system_config": FAST_HEALTH_CHECKS})
        self.nodes = [self.add() for _ in range(2)]

    def add(self):
        pausing = {"ENGINE_PAUSE_AT": PAUSE_AT, "ENGINE_PAUSE_MODE": "hold", "ENGINE_PAUSE_FILE": str(self.marker),
                   "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        before = {key: os.environ.get(key) for key in pausing}
        os.environ.update(pausing)  # inherited by the node's raylet and its workers, not by this process's engine
        try:
            node = self.cluster.add_node(num_cpus=1, num_gpus=1)
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.cluster.wait_for_nodes()
        return node

    def node(self, node_id: str):
        return next(node for node in self.nodes if node.node_id == node_id)

    def replace(self, node) -> None:
        """Remove `node` (whatever state it is in) and add a fresh one, for the next test."""
        self.nodes.remove(node)
        try:
            self.cluster.remove_node(node, allow_graceful=False)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.nodes.append(self.add())

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: these tests make their own cluster")
    nodes = TwoNodes(tmp_path_factory.mktemp("pause") / "paused")
    yield nodes
    nodes.shutdown()


def _settings(tmp_path: Path, shared_models: Path, address: str, max_retries: int = 3, **daemon) -> Settings:
    return Settings.from_table({"paths": {"models": str(shared_models)},
                                "daemon": {"stable_seconds": 0.2, "scan_seconds": 0.2, "lease_seconds": 5.0, "metrics_port": 0,
                                           "daemon_id": "head", "backend": "ray", **daemon,
                                           "ray": {"address": address, "gpus_per_job": 1.0, "cpus_per_job": 1.0,
                                                   "max_retries": max_retries}}},
                               root=tmp_path)


def _wait(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def _drop(inbox: Path, name: str) -> Path:
    from skimage import data

    from engine.images import png_bytes

    mirrored = png_bytes(data.astronaut()[:, ::-1].copy())
    return drop_job(inbox, name, job_toml=FAST_JOB, photos={"a.png": photo_bytes(), "b.png": mirrored})


def _paused_attempt(cluster: TwoNodes, work: Path) -> tuple[Path, dict]:
    """Wait until the job's attempt holds at PAUSE_AT; its container and worker record."""
    _wait(cluster.marker.exists, f"the job to reach {PAUSE_AT}", 180)
    (job,) = _wait(lambda: [job for job in find_claims(work) if worker_record(job)], "the worker record")
    return job.container, worker_record(job)


def _published(outbox: Path) -> list[Path]:
    return sorted(path for subject in outbox.iterdir() if not subject.name.startswith(".") for path in subject.iterdir())


def _clean_run(settings: Settings, dropped: dict[str, bytes], source: Path, origin: Path, job_id: str, root: Path) -> Path:
    """The same job run once, uninterrupted, by the engine in this process, from the same place
    (the claimed folder's path: the ledger records it), with the same job id and origin."""
    assert not source.exists()
    for rel, data in dropped.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    try:
        result = Engine(settings, demo=True).run_job(source, root / "clean-outbox", job_id=job_id, refresh_inputs=False, origin=origin)
    finally:
        shutil.rmtree(source.parent)
    assert result.outcome == "finished", result
    return result.output_dir


def _same_as_clean(clean: Path, final: Path) -> list[str]:
    """bench/soak.py's comparison: every file byte for byte but the run-specific ones, the
    manifest, the audit log's content (each attempt's lines carry its own claim generation)."""
    soak = _soak()
    skip = {"audit.jsonl", "manifest.json", "report.html", "signature.json"}
    clean_files, final_files = hash_tree(clean, clean), hash_tree(final, final)
    problems = [f"{rel}: differs" for rel in sorted(set(clean_files) | set(final_files))
                if rel not in skip and clean_files.get(rel) != final_files.get(rel)]
    problems += soak.compare_manifests(clean / "manifest.json", final / "manifest.json")
    return problems + soak.compare_audits(clean / "audit.jsonl", final / "audit.jsonl", also_volatile=frozenset({"fence"}))


class Running:
    """A real Service with the ray backend, in a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.service = Service(settings, load_daemon_settings(settings), demo=True)
        self.thread = threading.Thread(target=self.service.run, name="service")
        self.thread.start()
        _wait(lambda: self.service.backend is not None and self.service.metrics_port and self.thread.is_alive(), "the daemon to start", 180)

    def value(self, name: str, **labels: str) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.service.request_stop("test")
        self.thread.join(120)
        assert not self.thread.is_alive()


def test_a_node_removed_mid_train_the_job_resumes_on_the_other_node_identical_to_a_clean_run(tmp_path, shared_models, cluster):
    settings = _settings(tmp_path, shared_models, cluster.cluster.address)
    daemon = Running(settings)
    try:
        paths = daemon.service.paths
        dropped = _drop(paths.inbox, "nina")
        kept = folder_snapshot(dropped)
        container, first = _paused_attempt(cluster, paths.work)
        assert first["generation"] == 0
        status = daemon_status(paths.inbox, paths.work, paths.outbox, paths.failed, stable_seconds=0.2, last=5)
        (held,) = status.claims  # `daemon status` shows which node runs which job
        assert (held.node, held.worker_pid, held.generation) == (first["node"], first["pid"], 0)
        assert f"runs on node {first['node']} (worker pid {first['pid']}, claim generation 0)" in format_daemon_status(status)
        victim = cluster.node(first["node_id"])
        cluster.replace(victim)  # the node goes away (raylet and workers killed); a fresh one joins for the next test
        cluster.marker.unlink()
        _wait(lambda: daemon.value("idrep_jobs_total", outcome="finished") == 1, "the job to finish on the other node", 180)
        assert daemon.value("idrep_attempts_lost_total", backend="ray") == 1
        assert not container.exists() and find_claims(paths.work) == []
    finally:
        daemon.stop()
    (final,) = _published(paths.outbox)
    assert folder_snapshot(final / "inputs") == kept
    assert verify_audit(final).ok
    events = audit_events(final)
    fences = [event["fence"] for event in events]
    assert fences == sorted(fences) and set(fences) == {0, 1}  # the retry ran under generation 1, after every line of generation 0
    retry = events[next(i for i, e in enumerate(events) if e["event"] == "job_resumed"):]
    assert {e["stage"] for e in retry if e["event"] == "stage_skipped"} == {"prepare", "embed"}
    assert [e["event"] for e in retry].count("train_resumed") == 1  # from the first phase's checkpoint, not from step 0
    clean = _clean_run(settings, kept, container / "nina", paths.inbox / "nina", final.name, tmp_path)
    assert _same_as_clean(clean, final) == []


def test_a_frozen_node_whose_job_was_retried_writes_nothing_when_it_wakes(tmp_path, shared_models, cluster):
    settings = _settings(tmp_path, shared_models, cluster.cluster.address)
    daemon = Running(settings)
    frozen: list[int] = []
    try:
        paths = daemon.service.paths
        _drop(paths.inbox, "omar")
        _container, first = _paused_attempt(cluster, paths.work)
        victim = cluster.node(first["node_id"])
        raylet = victim.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        frozen = [first["pid"], raylet]
        for pid in frozen:  # the whole node stops (a paused VM, a host that hangs): the cluster declares it dead
            os.kill(pid, signal.SIGSTOP)
        cluster.marker.unlink()  # the retry passes the pause point; the frozen attempt is released from it when it wakes
        _wait(lambda: daemon.value("idrep_jobs_total", outcome="finished") == 1, "the retry to finish", 180)
        (final,) = _published(paths.outbox)
        published = hash_tree(final, final)
        os.kill(first["pid"], signal.SIGCONT)  # the worker wakes (its raylet stays frozen: nothing kills it)
        woke = _wait(lambda: _fenced(cluster, first["pid"]), "the woken attempt to find the later generation", 60)
        # The retry finished and its claim was settled: the woken attempt finds its container gone
        # (or, had it woken sooner, generation 1 in it); either way its fence refuses.
        assert "container is gone" in woke or "generation 1 exists" in woke
        time.sleep(1.0)
        assert hash_tree(final, final) == published  # not one byte more in the published job
        assert not (paths.outbox / WORK_DIR).exists() or not any((paths.outbox / WORK_DIR).iterdir())  # no work folder made again
        assert verify_audit(final).ok
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if frozen:
            cluster.replace(victim)
        daemon.stop()


def _fenced(cluster: TwoNodes, pid: int) -> str | None:
    """The woken worker's own log line saying its fence refused (Ray keeps each worker's stdout)."""
    logs = Path(cluster.cluster.head_node.get_session_dir_path()) / "logs"
    for path in logs.glob(f"worker-*-{pid}.out"):
        for line in path.read_text(errors="replace").splitlines():
            if '"job_ownership_lost"' in line:
                return json.loads(line[line.index("{"):]).get("at", "")
    return None


def test_the_daemon_killed_and_started_again_submits_the_job_again_and_it_finishes_once(tmp_path, shared_models, cluster):
    extra = f'[daemon.ray]\naddress = "{cluster.cluster.address}"\ngpus_per_job = 1.0\ncpus_per_job = 1.0\n'
    config = write_config(tmp_path, shared_models, extra, stable_seconds=0.2, scan_seconds=0.2, lease_seconds=5.0, metrics_port=0,
                          daemon_id="head", backend="ray")
    logs = tmp_path / "logs"
    logs.mkdir()
    first = Daemon(config, logs, name="first").wait_started(180)
    try:
        _drop(tmp_path / "inbox", "lena")
        container, record = _paused_attempt(cluster, tmp_path / "work")
        first.kill()  # its driver dies: Ray ends its workers; the claim stays, its process dead
        _wait(lambda: not os.path.exists(f"/proc/{record['pid']}"), "the killed daemon's worker to end", 60)
        cluster.marker.unlink()
        second = Daemon(config, logs, name="second").wait_started(180)
        try:
            taken = second.wait_for("claim_taken_over", 60, reason="restart")
            assert taken["generation"] == 1
            ended = second.wait_for("job_ended", 240)
            assert ended["outcome"] == "finished" and ended["backend"] == "ray" and ended["node"]
        finally:
            assert second.terminate() == 0
    finally:
        if first.process.poll() is None:
            first.kill()
    (final,) = _published(tmp_path / "outbox")
    assert not container.exists()
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").iterdir())
    events = audit_events(final)
    assert [e["event"] for e in events].count("job_finished") == 1
    assert {e["stage"] for e in events if e["event"] == "stage_skipped"} >= {"prepare", "embed"}
    assert verify_audit(final).ok


def test_a_stop_reaches_the_worker_the_job_stays_claimed_released_and_resumable(tmp_path, shared_models, cluster):
    settings = _settings(tmp_path, shared_models, cluster.cluster.address)
    daemon = Running(settings)
    paths = daemon.service.paths
    _drop(paths.inbox, "ines")
    container, _first = _paused_attempt(cluster, paths.work)
    daemon.service.request_stop("test")  # SIGTERM: the worker is asked to stop at its next safe point ...
    time.sleep(1.5)
    cluster.marker.unlink()  # ... which is right after the pause point it holds at
    daemon.thread.join(120)
    assert not daemon.thread.is_alive()
    assert daemon.value("idrep_jobs_total", outcome="interrupted") == 1
    (job,) = find_claims(paths.work)
    assert job.container == container and job.claim.released and job.claim.crashes == 0  # a clean stop, no crash
    events = [json.loads(line) for line in (paths.outbox / WORK_DIR / job.job_id / "audit.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "job_interrupted"
    assert not any(path.name == "ines" for path in paths.outbox.iterdir())


def test_retries_are_bounded_a_job_whose_attempts_keep_being_lost_goes_to_failed_with_its_inputs(tmp_path, shared_models, cluster):
    """[daemon.ray] max_retries = 0: the first attempt lost with its node is the last; the job goes
    to failed/ as too_many_crashes, its dropped folder byte for byte in inputs/, nothing left claimed."""
    settings = _settings(tmp_path, shared_models, cluster.cluster.address, max_retries=0)
    daemon = Running(settings)
    try:
        paths = daemon.service.paths
        dropped = _drop(paths.inbox, "yara")
        kept = folder_snapshot(dropped)
        _container, first = _paused_attempt(cluster, paths.work)
        cluster.replace(cluster.node(first["node_id"]))
        cluster.marker.unlink()
        _wait(lambda: daemon.value("idrep_job_failures_total", code="too_many_crashes") == 1, "the job to be given up", 120)
        assert daemon.value("idrep_attempts_lost_total", backend="ray") == 1 and daemon.value("idrep_jobs_total", outcome="finished") == 0
        assert find_claims(paths.work) == []
    finally:
        daemon.stop()
    (failed,) = list((paths.failed / "yara").iterdir())
    error = json.loads((failed / "error.json").read_text())
    assert error["code"] == "too_many_crashes" and error["details"]["crashes"] == 1 and error["details"]["backend"] == "ray"
    assert folder_snapshot(failed / "inputs") == kept


def test_a_worker_lost_while_idle_is_replaced_before_a_job_is_given_to_it_and_charges_no_crash(tmp_path, shared_models, cluster):
    settings = _settings(tmp_path, shared_models, cluster.cluster.address)
    daemon = Running(settings)
    try:
        backend, paths = daemon.service.backend, daemon.service.paths
        _wait(lambda: backend.capacity() == 2, "both workers to answer")
        first_slot = backend._slots[0]  # noqa: SLF001 - the slot the next job is offered first
        cluster.replace(cluster.node(first_slot.info["node_id"]))  # its node dies while it has no job
        _drop(paths.inbox, "zoe")
        _wait(cluster.marker.exists, f"the job to reach {PAUSE_AT}", 120)
        cluster.marker.unlink()
        _wait(lambda: daemon.value("idrep_jobs_total", outcome="finished") == 1, "the job to finish", 120)
        assert daemon.value("idrep_attempts_lost_total", backend="ray") == 0
    finally:
        daemon.stop()
    (final,) = _published(paths.outbox)
    assert {event["fence"] for event in audit_events(final)} == {0}  # one attempt, generation 0: no crash charged


def test_a_stop_does_not_wait_for_an_attempt_that_never_got_a_gpu(tmp_path, shared_models, cluster):
    """A fresh worker per attempt that asks for 2 GPUs where no node has 2: it never starts. A
    stop must not hang on it: the job stays claimed, released, with no crash."""
    settings = Settings.from_table({"paths": {"models": str(shared_models)},
                                    "daemon": {"stable_seconds": 0.2, "scan_seconds": 0.2, "lease_seconds": 5.0, "metrics_port": 0,
                                               "daemon_id": "head", "backend": "ray",
                                               "ray": {"address": cluster.cluster.address, "gpus_per_job": 2.0, "workers": 1,
                                                       "keep_models_loaded": False}}}, root=tmp_path)
    daemon = Running(settings)
    paths = daemon.service.paths
    _drop(paths.inbox, "ava")
    _wait(lambda: daemon.value("idrep_job_in_progress") == 1, "the job to be claimed and submitted")
    time.sleep(1.0)
    started = time.monotonic()
    daemon.stop()
    assert time.monotonic() - started < 60
    assert daemon.value("idrep_jobs_total", outcome="interrupted") == 1
    (job,) = find_claims(paths.work)
    assert job.claim.released and job.claim.crashes == 0 and job.generation == 0 and worker_record(job) is None
