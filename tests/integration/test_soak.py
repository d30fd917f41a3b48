"""A small crash soak (bench/soak.py): SIGKILL the engine at random points of the demo job,
resume by re-running the same command, and compare the finished job with a clean run.

Slow (the demo job takes a minute or two on a 2-core CPU, and every resume loads the models
again): run it with `pytest -m slow tests/integration/test_soak.py`. The full soak is
`.venv/bin/python bench/soak.py` (50 kills); its figures are in bench/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness.paths import REPO


@pytest.mark.slow
def test_five_kills_leave_a_job_identical_to_a_clean_run(tmp_path):
    workdir = tmp_path / "soak"
    process = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--kills", "5", "--seed", "5", "--workdir", str(workdir)],
                             cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-2000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["ok"] and not summary["problems"]
    assert summary["kills_landed"] == 5
    assert sum(summary["kills_per_segment"].values()) == 5
    assert summary["resumes"] >= 5  # every kill is followed by a re-run of the same command
    assert summary["verify_audit_ok"] == summary["rounds"] >= 1
