"""The Ray backend as a lab runs it (slow: `pytest -m slow tests/e2e/test_ray_cli.py`): a head
started with `ray start --head`, two GPU nodes with `ray start --address` on 127.0.0.1 (one GPU
each, the demo model on the CPU), `python -m daemon --backend ray`; the raylet of the node that
runs the job is SIGKILLed mid-train. The job is run again on the other node and published once,
resumed from its ledger, and passes verify-audit."""

from __future__ import annotations

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
from tests.conftest import FAST_JOB  # noqa: E402
from tests.e2e.conftest import Daemon, audit_events, drop_job, photo_bytes, write_config  # noqa: E402

PAUSE_AT = "train:phase_boundary:1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*arguments: str, env: dict[str, str]) -> None:
    """The `ray` command of this interpreter's environment (the same Ray as the daemon's)."""
    done = subprocess.run([str(Path(sys.executable).with_name("ray")), *arguments], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


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
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)  # every process of this cluster, none of another
        shutil.rmtree(temp_dir, ignore_errors=True)
