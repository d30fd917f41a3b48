"""Anchored face mining as a stage of an evaluate job (issue 17), with the demo model: growing
batches, every candidate recorded with its decision, the report's mining section, and a kill
mid-mining that resumes from the finished batches. (The accept / prune / relax / anchor logic
itself is tested on synthetic embeddings in tests/unit/test_mining.py: the demo model's noise
holds no face, so here every candidate is a counted `no_face`.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.audit import verify_audit
from engine.errors import JobError
from engine.images import read_rgb
from engine.job import MineSpec, load_job
from engine.jobfolder import work_dir
from engine.stages.mine import batch_sizes
from tests.conftest import REPO, make_job
from tests.integration.test_evaluate import TRAIN

JOB = 'kind = "evaluate"\n' + TRAIN + """
[evaluate]
prompts = ["a photo of {trigger}"]
seeds = [0]
steps = 1

[mine]
enabled = true
steps = 2
batch = 2
growth = 2.0
budget = 6
target = 4
"""
JOB_ID = "20260101T000000Z-mine"


def test_batches_grow_until_the_budget():
    assert batch_sizes(MineSpec(batch=4, growth=2.0, max_batch=16, budget=64)) == [4, 8, 16, 16, 16, 4]
    assert batch_sizes(MineSpec(batch=3, growth=1.0, budget=7)) == [3, 3, 1]


@pytest.fixture(scope="module")
def mined(tmp_path_factory, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("mine")
    (root / "models").mkdir()
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    source = make_job(root / "inbox" / "alice", {"a.png": astronaut_rgb}, JOB)
    result = Engine(settings, demo=True).run_job(source, root / "outbox", job_id=JOB_ID)
    assert result.outcome == "finished", result.error
    return root, result.output_dir


def test_mining_records_every_candidate_and_stops_at_its_budget(mined):
    _, out = mined
    info = json.loads((out / "mine" / "mine.json").read_text())
    assert [c["seed"] for c in info["candidates"]] == list(range(1000, 1006)) and [c["batch"] for c in info["candidates"]] == [1, 1, 2, 2, 2, 2]
    assert info["decisions"] == {"no_face": 6} and info["members"] == [] and "budget of 6" in info["stop_reason"]
    assert info["rule"]["anchor_max_drift"] == 0.4 and info["anchored_to"] == "embedding/reference.npy"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(c["file"] in manifest["outputs"] for c in info["candidates"]) and "report/mine.png" in manifest["outputs"]
    page = (out / "report.html").read_text()
    assert 'id="mine"' in page and "budget of 6" in page
    assert verify_audit(out).ok and not (out / "mine_progress").exists()


def test_mining_is_off_unless_enabled_and_cannot_be_unanchored(tmp_path, astronaut_rgb):
    spec = load_job(make_job(tmp_path / "a", {"a.png": astronaut_rgb}, 'kind = "evaluate"\n' + TRAIN), {}, (".png",), ()).spec
    assert spec.mine.enabled is False
    with pytest.raises(JobError) as caught:
        load_job(make_job(tmp_path / "b", {"a.png": astronaut_rgb}, 'kind = "evaluate"\n' + TRAIN + "[mine]\nenabled = true\nanchor_max_drift = 0\n"),
                 {}, (".png",), ())
    assert any(p.where == "job.toml: mine.anchor_max_drift" for p in caught.value.problems)


def test_mining_killed_after_a_batch_resumes_from_it(mined, tmp_path, astronaut_rgb):
    root, out = mined
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{root / "models"}"\n')
    source = make_job(tmp_path / "inbox" / "alice", {"a.png": astronaut_rgb}, JOB)
    outbox = tmp_path / "outbox"
    marker = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_PAUSE_AT="mine:batch:1", ENGINE_PAUSE_FILE=str(marker))
    command = [sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox", str(outbox), "--demo", "--job-id", JOB_ID]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "never reached the first batch"
            time.sleep(0.05)
        assert (work_dir(outbox, JOB_ID) / "mine_progress" / "batch_0.json").is_file()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    rerun = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = Path(json.loads(rerun.stdout.strip().splitlines()[-1])["output"])
    events = [json.loads(line) for line in (final / "audit.jsonl").read_text().splitlines()]
    [finished] = [e for e in events if e["event"] == "mine_finished"]
    assert finished["resumed_candidates"] == 2 and finished["candidates"] == 6
    first, again = (json.loads((folder / "mine" / "mine.json").read_text())["candidates"] for folder in (out, final))
    for a, b in zip(first, again):
        assert a["decision"] == b["decision"] and np.array_equal(read_rgb(out / a["file"]), read_rgb(final / b["file"]))
    assert verify_audit(final).ok
