"""Training without a host sync per step (issue 19): `train.sync_every` keeps the losses on the
device for a block of steps and feeds the convergence test at the block's end. A block of 1 is
the per-step loop as it was (checked bit for bit against the pre-change engine when it was
written: LoRA, train.json and loss.csv); a larger block sees the same first exit at the same
step and acts on it at the block's end, recording the step it fired. And one engine (the
daemon's) loads the base model once for every job it runs."""

from __future__ import annotations

import json
import math

import pytest
import structlog

from engine.jobfolder import work_dir
from tests.harness.jobs import make_job

JOB = """\
[prepare]
size = 128
rotations = [-10]
crops = []

[train]
rank = 4
max_steps = 90
checkpoint_every = 40
plateau_window = 15
probe_every = 5
probe_size = 2
sync_every = {sync}

[[train.phases]]
name = "COARSE"
min_steps = 15
max_steps = 45

[[train.phases]]
name = "FINE"
lr = 1e-6
alpha = 2
loss = "charbonnier"
optimizer = "adamp"
min_steps = 15
max_steps = 45

[verify]
seeds = 1
steps = 1

[[render]]
prompt = "portrait"
steps = 1
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("sync")
    (root / "models").mkdir()
    engine = Engine(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)
    out = {}
    with structlog.testing.capture_logs() as logs:
        for sync in (1, 7):
            source = make_job(root / "inbox" / f"s{sync}", {"a.png": astronaut_rgb}, JOB.format(sync=sync))
            result = engine.run_job(source, root / "outbox", until="train")
            assert result.error is None, result.error
            job_dir = work_dir(root / "outbox", result.job_id)
            out[sync] = (json.loads((job_dir / "train" / "train.json").read_text()), (job_dir / "train" / "loss.csv").read_text().splitlines())
    return out, logs


def test_a_block_of_one_step_acts_on_every_exit_at_once(runs):
    train, _ = runs[0][1]
    assert all("exit_fired_at_phase_step" not in phase for phase in train["phases"])


def test_a_larger_block_sees_the_same_first_exit_and_acts_at_the_blocks_end(runs):
    (one, one_loss), (seven, seven_loss) = runs[0][1], runs[0][7]
    first, later = one["phases"][0], seven["phases"][0]
    assert first["exit_reason"] == later["exit_reason"] == "converged"
    fired = later.get("exit_fired_at_phase_step", later["steps"])
    assert fired == first["steps"]  # the same losses up to there: the same step
    assert later["steps"] == min(math.ceil(fired / 7) * 7, 45) and later["steps"] - fired < 7  # acted on within one block
    assert seven_loss[1:fired + 1] == one_loss[1:fired + 1]  # bit for bit until the exit fired
    # The next phase starts from a LoRA a few steps further on: its exit, too, within a block of the per-step one.
    assert abs(seven["phases"][1].get("exit_fired_at_phase_step", seven["phases"][1]["steps"]) - one["phases"][1]["steps"]) <= 7


def test_one_engine_loads_the_base_model_once_for_every_job(runs):
    _, logs = runs
    assert sum(1 for line in logs if line.get("event") == "pipeline_loaded") == 1
