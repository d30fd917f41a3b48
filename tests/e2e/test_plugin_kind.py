"""Adding a kind is one file plus the stages it adds (issue 32): the kind `stamp`, defined only in
tests/harness/stamp_kind.py with a stage of its own, named in config.toml `[kinds] plugins`, runs
end to end through a real daemon: published in the outbox with its outputs, its audit verified by
`python -m engine verify-audit`, shown by `python -m engine status`, its stage timed in /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.harness.lab import Lab, drop_job, photo_bytes
from tests.harness.paths import REPO
from tests.harness.stamp_kind import STAMP_FILE

STAMP_JOB = """\
kind = "stamp"

[prepare]
size = 64
rotations = []
crops = []
remove_background = false

[stamp]
text = "seen by the daemon"
"""


def _engine_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))


def test_a_kind_defined_only_in_the_tests_runs_through_the_daemon(lab: Lab):
    config = lab.configure(extra_toml='[kinds]\nplugins = ["tests.harness.stamp_kind"]\n', stable_seconds=0.5)
    daemon = lab.start()
    drop_job(lab.inbox, "alice", job_toml=STAMP_JOB, photos={"a.png": photo_bytes()})
    ended = daemon.wait_for("job_ended", 60)
    assert ended["outcome"] == "finished", daemon.tail()

    [job_dir] = lab.finished_jobs()["alice"]
    assert json.loads((job_dir / STAMP_FILE).read_text()) == {"prepared": ["prepared/0-a_base.png"], "subject": "alice",
                                                              "text": "seen by the daemon"}
    assert "<h1>Stamp report: alice</h1>" in (job_dir / "report.html").read_text()
    events = [json.loads(line) for line in (job_dir / "audit.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "stamp" and events[0]["settings"]["kinds"] == {"plugins": ["tests.harness.stamp_kind"]}
    assert [e["stage"] for e in events if e["event"] == "stage_finished"] == ["prepare", "stamp"]
    assert json.loads((job_dir / "manifest.json").read_text())["kind"] == "stamp"

    verified = _engine_cli("verify-audit", str(job_dir))
    assert verified.returncode == 0 and verified.stdout.startswith("OK: "), verified.stderr
    status = _engine_cli("--config", str(config), "status", "--outbox", str(lab.outbox))
    assert status.returncode == 0, status.stderr
    assert f"alice  {job_dir.name}  stamp  FINISHED" in status.stdout
    metrics = daemon.metrics()
    assert metrics['idrep_jobs_total{outcome="finished"}'] == 1 and metrics['idrep_stage_duration_seconds_count{stage="stamp"}'] == 1
    assert daemon.terminate() == 0
