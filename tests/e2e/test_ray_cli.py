"""The Ray backend as a lab runs it: `python -m daemon --backend ray` beside clusters started with
`ray start`.

- (slow: `pytest -m slow tests/e2e/test_ray_cli.py`) a head started with `ray start --head`, two
  GPU nodes with `ray start --address` on 127.0.0.1 (one GPU each, the demo model on the CPU); the
  raylet of the node that runs the job is SIGKILLed mid-train. The job is run again on the other
  node and published once, resumed from its ledger, and passes verify-audit.
- [daemon.ray] address = "local" starts a private cluster even where another one runs on the host
  (`ray start --head` wrote its address where ray.init() without an address finds it) or
  RAY_ADDRESS names a host that does not answer.
- A configured address that does not answer is refused (ray_unreachable, naming it) within
  connect_timeout_seconds, and a SIGTERM while the daemon waits for it stops the daemon at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from daemon.claim import find_claims, worker_record  # noqa: E402
from engine import verify_audit  # noqa: E402
from tests.harness.jobs import FAST_JOB  # noqa: E402
from tests.harness.lab import Daemon, audit_events, drop_job, photo_bytes, write_config  # noqa: E402

PAUSE_AT = "train:phase_boundary:1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*arguments: str, env: dict[str, str]) -> None:
    """The `ray` command of this interpreter's environment (the same Ray as the daemon's)."""
    done = subprocess.run([str(Path(sys.executable).with_name("ray")), *arguments], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _kill_cluster(temp_dir: str) -> None:
    """SIGKILL the processes of the cluster whose temp dir is `temp_dir` (those naming it on their
    command line, and their children: Ray's agents retitle themselves), by pid; `ray stop` would
    stop every Ray process of this user on the machine."""
    parents: dict[int, int] = {}
    chosen: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if temp_dir in command:
            chosen.add(int(entry.name))
    while more := {pid for pid, parent in parents.items() if parent in chosen} - chosen:
        chosen |= more
    for pid in chosen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_raylet_sigkilled_mid_job_the_daemon_runs_it_again_on_the_other_node(tmp_path, shared_models):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: this test starts its own cluster")
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rt")  # Ray's sockets live here: the path must be short
    port = _free_port()
    marker = tmp_path / "paused"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_PAUSE")}
    base.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    nodes = dict(base, ENGINE_PAUSE_AT=PAUSE_AT, ENGINE_PAUSE_MODE="hold", ENGINE_PAUSE_FILE=str(marker))
    try:
        _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=base)
        for _ in range(2):
            _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1",
                 "--disable-usage-stats", env=nodes)
        extra = f'[daemon.ray]\naddress = "127.0.0.1:{port}"\n'
        config = write_config(tmp_path, shared_models, extra, stable_seconds=0.2, scan_seconds=0.2, lease_seconds=10.0, metrics_port=0,
                              daemon_id="head")
        logs = tmp_path / "logs"
        logs.mkdir()
        daemon = Daemon(config, logs, "--backend", "ray").wait_started(180)
        try:
            folder = drop_job(tmp_path / "inbox", "mia", job_toml=FAST_JOB, photos={"a.png": photo_bytes()})
            assert folder.name == "mia"
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < deadline, f"the job never reached {PAUSE_AT}\n{daemon.tail()}"
                time.sleep(0.1)
            (job,) = find_claims(tmp_path / "work")
            record = worker_record(job)
            assert record is not None and record["generation"] == 0
            raylet = int(Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
            assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_bytes().decode(errors="replace")
            os.kill(raylet, signal.SIGKILL)
            marker.unlink()
            lost = daemon.wait_for("attempt_lost", 120)
            assert lost["generation"] == 1 and lost["crashes"] == 1
            ended = daemon.wait_for("job_ended", 300)
            assert ended["outcome"] == "finished", daemon.tail()
        finally:
            assert daemon.terminate() == 0
        (final,) = list((tmp_path / "outbox" / "mia").iterdir())
        assert verify_audit(final).ok
        events = audit_events(final)
        assert [e["event"] for e in events].count("job_finished") == 1
        assert {e["fence"] for e in events} == {0, 1}
        assert {e["stage"] for e in events if e["event"] == "stage_skipped"} >= {"prepare", "embed"}
        assert find_claims(tmp_path / "work") == []
    finally:
        _kill_cluster(temp_dir)  # every process of this cluster, none of another
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---- address = "local" is private; a configured address has a deadline -------------------------

PRIVATE = '[daemon.ray]\naddress = "local"\ngpus_per_job = 0.0\ncpus_per_job = 1.0\nworkers = 1\nkeep_models_loaded = false\n'


@pytest.fixture()
def decoy():
    """Another Ray cluster on this host, as a user's `ray start --head --num-gpus 3` leaves it: its
    address in <temp>/ray/ray_current_cluster, where ray.init() without an address finds it. The
    temp dir is a folder of its own (RAY_TMPDIR, given to the daemon too) so that no other Ray
    user of this machine finds it; its processes are killed by pid afterwards."""
    temp = tempfile.mkdtemp(prefix="/tmp/rd")  # Ray's sockets live under it: the path must be short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0")
    try:
        _ray("start", "--head", f"--port={_free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=3",
             "--include-dashboard=false", "--disable-usage-stats", env=env)
        yield Path(temp)
    finally:
        _kill_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def unanswered():
    """An address where no Ray cluster answers, "127.0.0.1:PORT": the port is held (bound, never
    listening) for the test, so every connect is refused and nothing else can take it. Ray's
    connect retries such an address for ~12 minutes. (10.255.255.1:6379 is no substitute on
    every network: here a proxy answered it with HTTP 404, which Ray gives up on in ~20 s.)"""
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))  # Ray turns 127.0.0.1 into this host's own address
        yield f"127.0.0.1:{held.getsockname()[1]}"


def _json_only(daemon: Daemon) -> None:
    """The daemon's stdout is JSON lines only (Ray's own chatter, if any, goes to stderr)."""
    for line in daemon.raw:
        json.loads(line)


def test_address_local_starts_a_private_cluster_beside_another_one_on_the_host(tmp_path, shared_models, decoy):
    decoy_address = (decoy / "ray" / "ray_current_cluster").read_text().strip()
    decoy_session = (decoy / "ray" / "session_latest").resolve()
    config = write_config(tmp_path, shared_models, PRIVATE, metrics_port=0, daemon_id="private", backend="ray")
    home = tmp_path / "home"
    home.mkdir()
    daemon = Daemon(config, tmp_path, env={"RAY_TMPDIR": str(decoy), "HOME": str(home)})
    try:
        started = daemon.wait_for("ray_backend_started", 120)
        daemon.wait_started(60)
        assert started["cluster_gpus"] == 0 and started["nodes"] == 1  # not the decoy, which declares 3 GPUs ...
        assert started["gcs_address"] != decoy_address  # ... nor answers at its address
        private = Path(started["temp_dir"])
        assert private.parent == decoy and private.is_dir()
        # The user's own cluster stays the one their `ray` tools find.
        assert (decoy / "ray" / "ray_current_cluster").read_text().strip() == decoy_address
        assert (decoy / "ray" / "session_latest").resolve() == decoy_session
        assert not (home / ".ray").exists()  # no ~/.ray/auth_token: it would turn token auth on for the user's `ray start`s
    finally:
        assert daemon.terminate(60) == 0
    assert not private.exists()  # removed with the private cluster
    _json_only(daemon)


def test_address_local_starts_a_private_cluster_when_ray_address_names_one_that_does_not_answer(tmp_path, shared_models, unanswered):
    config = write_config(tmp_path, shared_models, PRIVATE, metrics_port=0, daemon_id="private", backend="ray")
    daemon = Daemon(config, tmp_path, env={"RAY_ADDRESS": unanswered})
    try:
        started = daemon.wait_for("ray_backend_started", 120)  # not ~12 minutes in Ray's connect loop
        assert started["nodes"] == 1 and started["cluster_gpus"] == 0
        assert daemon.named("ray_address_ignored")[0]["ray_address"] == unanswered
        daemon.wait_started(60)
    finally:
        assert daemon.terminate(60) == 0


def test_an_address_that_does_not_answer_is_refused_within_connect_timeout_naming_it(tmp_path, shared_models, unanswered):
    extra = f'[daemon.ray]\naddress = "{unanswered}"\nconnect_timeout_seconds = 2.0\n'
    config = write_config(tmp_path, shared_models, extra, metrics_port=0, daemon_id="far", backend="ray")
    daemon = Daemon(config, tmp_path)
    daemon.wait_for("ray_connecting", 120, address=unanswered)
    connecting = time.monotonic()
    assert daemon.wait(60) == 2, daemon.tail()
    assert time.monotonic() - connecting < 2.0 + 5.0  # the deadline, not Ray's ~12 minutes of retries
    [refused] = daemon.named("refused_to_start")
    assert refused["code"] == "ray_unreachable"
    assert unanswered in refused["message"] and "within 2 s" in refused["message"]
    assert daemon.named("daemon_started") == []


def test_a_sigterm_while_connecting_to_the_cluster_stops_the_daemon_at_once(tmp_path, shared_models, unanswered):
    extra = f'[daemon.ray]\naddress = "{unanswered}"\nconnect_timeout_seconds = 600.0\n'
    config = write_config(tmp_path, shared_models, extra, metrics_port=0, daemon_id="far", backend="ray")
    daemon = Daemon(config, tmp_path)
    daemon.wait_for("ray_connecting", 120, address=unanswered)
    time.sleep(1.0)  # inside Ray's connect loop
    asked = time.monotonic()
    assert daemon.terminate(30) == 0, daemon.tail()
    assert time.monotonic() - asked < 5.0
    assert daemon.named("ray_connect_abandoned") and daemon.named("daemon_started") == []
    assert [line["exit_code"] for line in daemon.named("daemon_stopped")] == [0]
