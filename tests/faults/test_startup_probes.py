"""Start-up probes: a daemon (or `python -m engine run`) that could not publish what it runs
refuses to start, naming the folder and the fault, instead of burning jobs. It was: a read-only
outbox made every job "crash" three times in 1.5 s and be given up as too_many_crashes; a
scratch disk mounted at outbox/.work made every job run all its stages and then fail the
publishing rename (EXDEV)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness.paths import REPO
from tests.harness.lab import drop_job
from tests.harness.faults import check_evidence, drops_of, set_read_only, tmpfs


def _refused(lab, name: str) -> str:
    daemon = lab.start(name=name, wait=False)
    assert daemon.wait(90) == 2, daemon.tail()
    [line] = daemon.named("refused_to_start")
    return line["message"]


def test_unwritable_or_split_folders_are_refused_at_start_by_name(lab):
    outbox, failed = tmpfs(lab.outbox), tmpfs(lab.failed)
    lab.configure()
    dropped = {"alice": drops_of(drop_job(lab.inbox, "alice"))}

    set_read_only(outbox, True)
    message = _refused(lab, "ro-outbox")
    assert f"{outbox}: cannot be written: Read-only file system" in message
    set_read_only(outbox, False)

    set_read_only(failed, True)
    assert f"{failed}: cannot be written: Read-only file system" in _refused(lab, "ro-failed")
    set_read_only(failed, False)

    scratch = tmpfs(outbox / ".work", "16m")  # another disk mounted at the outbox's work area
    message = _refused(lab, "split-outbox")
    assert f"the outbox's work area {scratch} is not on the outbox's file system or mount" in message and "rename" in message

    # `python -m engine run` probes the same folders before it loads a model.
    config = lab.root / "config.toml"
    run = subprocess.run([sys.executable, "-m", "engine", "--config", str(config), "run", str(lab.inbox / "alice"), "--outbox", str(outbox),
                          "--failed", str(failed), "--demo"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"the outbox's work area {scratch} is not on the outbox's file system or mount ({outbox})" in run.stderr
    assert check_evidence(lab, dropped)["alice"] == ["inbox"]  # nothing was touched
