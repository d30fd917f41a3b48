"""A job killed at a named point and resumed, compared with its clean run (tests/integration's
test_resume and test_hostile_resume): the two-photo job, the engine CLI paused at a point and
killed there, and the outputs that must be equal between two runs of one job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.provenance.audit import AUDIT_FILE, MANIFEST_FILE
from engine.fsutil import hash_tree
from tests.harness.jobs import FAST_JOB, make_job
from tests.harness.paths import REPO

# Files that differ between any two runs of one job: the audit log (timestamps, resume lines),
# report.html, a view of it (it shows the audit head hash and the stages' times), and the signed
# head of both (signature.json names the audit head).
RUN_SPECIFIC = (AUDIT_FILE, "report.html", "signature.json")


def output_hashes(job_dir: Path) -> dict[str, str]:
    """Hashes of everything a job wrote, bar the run-specific files, the manifest (see `stable_manifest`) and the ledger."""
    return {k: v for k, v in hash_tree(job_dir, job_dir).items() if k not in RUN_SPECIFIC + (MANIFEST_FILE, "state.json")}


def stable_manifest(job_dir: Path) -> dict:
    """manifest.json without the hashes of the run-specific files it lists."""
    manifest = json.loads((job_dir / MANIFEST_FILE).read_text())
    manifest["outputs"] = {k: v for k, v in manifest["outputs"].items() if k not in RUN_SPECIFIC}
    return manifest


JOB_ID = "20260101T000000Z-test01"  # the same id in the clean and the killed run: outputs carry it


def engine_cli(config: Path, source: Path, outbox: Path, pause_at: str | None = None, marker: Path | None = None,
                job_id: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if pause_at:
        env.update(ENGINE_PAUSE_AT=pause_at, ENGINE_PAUSE_FILE=str(marker))
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox", str(outbox), "--demo"]
        + (["--job-id", job_id] if job_id else []),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill_at(config: Path, source: Path, outbox: Path, point: str, tmp_path: Path, job_id: str | None = None) -> None:
    marker = tmp_path / f"paused-{point.replace(':', '_')}"
    marker.unlink(missing_ok=True)
    process = engine_cli(config, source, outbox, point, marker, job_id)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"engine ended before reaching {point}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"engine never reached {point}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def make_two_photo_job(root: Path, astronaut_rgb: np.ndarray) -> tuple[Path, Path]:
    mirrored = np.ascontiguousarray(astronaut_rgb[:, ::-1])
    source = make_job(root / "inbox" / "alice", {"a.png": astronaut_rgb, "b.png": mirrored}, FAST_JOB)
    config = root / "config.toml"
    (root / "models").mkdir(exist_ok=True)
    config.write_text(f'[paths]\nmodels = "{root / "models"}"\n')
    return source, config
