"""A daemon started before its weights are staged (a models volume still being copied, a share
not mounted yet) must neither exit (a restart policy would loop) nor claim a job it cannot run:
it serves /metrics with idrep_ready 0, names every missing file and where it goes, and starts
claiming once they are there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.paths import REPO
from tests.harness.lab import drop_job


def _health(config: Path, port: int) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "daemon", "health", "--config", str(config), "--port", str(port)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.strip()


def test_a_daemon_without_its_weights_waits_names_them_and_starts_once_they_are_staged(lab, tmp_path: Path, shared_models: Path):
    models = tmp_path / "lab-models"
    models.mkdir()
    lab.models = models
    lab.configure(models_retry_seconds=0.5, extra_toml='[models]\nbase = "sd-lab"\n')
    daemon = lab.start(demo=False, wait=False)  # no --demo: the real-model path, with its weights not there yet

    missing = daemon.wait_for("models_missing", 90)
    assert any(str(models / "sd-lab") in line and "models.base" in line for line in missing["missing"]), missing
    assert daemon.process.poll() is None
    port = daemon.named("metrics_listening")[0]["port"]
    metrics = daemon.metrics()
    assert metrics["idrep_ready"] == 0 and metrics["idrep_models_missing"] == 1, metrics
    code, said = _health(lab.config, port)
    assert code == 1 and said.startswith("waiting for models: 1 missing"), said

    drop_job(lab.inbox, "ann")
    time.sleep(3)  # several re-checks and stable_seconds: still nothing claimed, the folder untouched
    assert daemon.named("job_claimed") == [] and (lab.inbox / "ann" / "job.toml").is_file()
    assert len(daemon.named("models_missing")) == 1  # said once, not at every re-check

    # Staged as a lab would: copied under another name, then moved into place.
    shutil.copytree(shared_models / "demo", models / ".sd-lab.copying")
    (models / ".sd-lab.copying").rename(models / "sd-lab")
    daemon.wait_for("models_staged", 30)
    daemon.wait_started(60)
    ended = daemon.wait_for("job_ended", 120, folder="ann")
    assert ended["outcome"] == "finished", ended
    metrics = daemon.metrics()
    assert metrics["idrep_ready"] == 1 and metrics["idrep_models_missing"] == 0, metrics
    assert _health(lab.config, port) == (0, "ready")
    assert daemon.terminate() == 0


def test_the_exit_code_in_the_log_is_the_process_exit_code(lab):
    import socket

    with socket.socket() as taken:  # the metrics port is in use: a refusal after the daemon got going
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        lab.configure(metrics_port=taken.getsockname()[1])
        daemon = lab.start(wait=False)
        code = daemon.wait(120)
    assert code == 2
    assert "cannot serve metrics" in daemon.named("refused_to_start")[0]["message"]
    assert [line["exit_code"] for line in daemon.named("daemon_stopped")] == [2]
