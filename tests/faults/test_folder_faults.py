"""A share that turns read-only, a disk that fills: the outbox alone, failed/ alone, both — under
one running daemon, one fault after the other, each fixed again. What must hold in each: no input
is lost or half-processed (every dropped file is in the inbox or its claimed folder until its
published copy is verified), a disk fault is never a crash nor a failure of the job (the job is
*held*, and the daemon stops claiming new jobs while a folder fails its probe), and once the fault
is fixed every job ends as it would have. Also the case that deleted an input outright: giving a
job up (too_many_crashes) while failed/ cannot be written.

Real faults only: outbox/ and failed/ are tmpfs mounts of their own, made read-only with
`mount -o remount,ro` and filled to the last byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from daemon.claim import Owner, claim_folder, find_claims, release
from tests.harness.lab import FAST_JOB, drop_job, photo_bytes
from tests.harness.faults import check_evidence, drops_of, filled, outcomes, set_read_only, tmpfs

BAD_JOB = "colour = 'blue'\n"  # refused as invalid_job: its way is through failed/


def _wait_paused(daemon, after: int) -> dict:
    """The daemon stopped claiming because a folder failed its probe."""
    paused = daemon.wait_for("claiming_paused", 60, after=after)
    metrics = daemon.metrics()
    assert metrics["idrep_ready"] == 0
    return paused


def test_read_only_and_full_outbox_and_failed_hold_jobs_then_they_end_as_they_would_have(lab, tmp_path):
    outbox, failed = tmpfs(lab.outbox), tmpfs(lab.failed)
    lab.configure(hold_retry_seconds=0.3, scan_seconds=0.5, lease_seconds=4.0, max_crashes=1, daemon_id="gpu-0")
    daemon = lab.start()
    photo = photo_bytes()
    dropped: dict[str, list] = {}
    folders = {"outbox": outbox, "failed": failed}
    number = 0
    for fault in ("read-only", "full"):
        for faulty in (("outbox",), ("failed",), ("outbox", "failed")):
            number += 1
            good, bad = f"good-{number}", f"bad-{number}"
            mark = daemon.mark()
            fillers = []
            for name in faulty:
                if fault == "read-only":
                    set_read_only(folders[name], True)
                else:
                    fillers.append(filled(folders[name]))
                    fillers[-1].__enter__()
            for name, job in ((good, FAST_JOB), (bad, BAD_JOB)):
                dropped[name] = drops_of(drop_job(lab.inbox, name, job_toml=job, photos={"photo.png": photo}))
            paused = _wait_paused(daemon, mark)
            held = daemon.wait_for("job_ended", 60, after=mark, outcome="held")
            expected = "outbox_unwritable" if fault == "read-only" else "disk_full"
            assert held["code"] == expected, held
            # The reason names the folder at fault and the OS error, in the log and in the claim.
            assert any(str(folders[name]) in problem for problem in paused["problems"] for name in faulty), paused
            [claim] = [job for job in find_claims(lab.work) if job.claim.held]
            assert claim.claim.held.startswith(expected) and ("Read-only file system" if fault == "read-only" else "No space left") in claim.claim.held
            assert claim.claim.crashes == 0
            time.sleep(1.5)  # scans while the fault lasts: nothing new is claimed, nothing moves
            assert len([job for job in find_claims(lab.work)]) == 1
            check_evidence(lab, dropped)

            for name in faulty:  # the lab fixes it
                if fault == "read-only":
                    set_read_only(folders[name], False)
            for filler in fillers:
                filler.__exit__(None, None, None)
            daemon.wait_for("claiming_resumed", 60, after=mark)
            assert daemon.wait_for("job_ended", 90, after=mark, folder=good, outcome="finished")
            assert daemon.wait_for("job_ended", 90, after=mark, folder=bad, outcome="failed")["code"] == "invalid_job"
            lab.wait_until(lambda: find_claims(lab.work) == [], 30, "the claims to be settled")
            places = check_evidence(lab, dropped)
            assert places[good] == ["outbox"] and places[bad] == ["failed"], places

    ended = outcomes(daemon)
    assert ended["crashed"] == 0 and ended["finished"] == 6 and ended["failed"] == 6 and ended["held"] >= 6, ended
    metrics = daemon.metrics()
    assert metrics['idrep_jobs_total{outcome="crashed"}'] == 0 and metrics["idrep_ready"] == 1
    assert metrics['idrep_job_holds_total{code="disk_full"}'] >= 3 and metrics['idrep_job_holds_total{code="outbox_unwritable"}'] >= 3
    assert daemon.terminate() == 0


def test_giving_a_job_up_while_failed_cannot_be_written_holds_it_instead_of_deleting_it(lab):
    """It was: outcome set to "failed" first, the failed/ copy raised, and settling the claim
    discarded the container with the only copy. Here the job that crashed a daemon holds a
    sub-folder 300 levels deep (Python's recursive copytree overflowed on such a tree)."""
    failed = tmpfs(lab.failed)
    lab.configure(hold_retry_seconds=0.3, scan_seconds=0.5, lease_seconds=4.0, max_crashes=1)
    staging = lab.root / "staging"
    folder = drop_job(staging, "ivan", ready_marker=False)
    deep = folder / "raw"
    deep.mkdir()
    path = str(deep)
    for _ in range(300):
        path = os.path.join(path, "d")
        os.mkdir(path)
    with open(os.path.join(path, "bottom.txt"), "w") as handle:
        handle.write("the deepest note")
    dropped = {"ivan": drops_of(folder)}
    # A daemon that died while running it (its pid is gone): the job has crashed once.
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    daemon = lab.start()
    set_read_only(failed, True)  # the share turns read-only under the running daemon
    ghost = claim_folder(folder, lab.work, "20260101T000000Z-ghost1", Owner("gpu-9", socket.gethostname(), dead_pid), lease_seconds=4.0)
    assert ghost is not None and release(ghost, crashed=True)
    held = daemon.wait_for("job_ended", 60, job_id=ghost.job_id, outcome="held")
    assert held["code"] == "outbox_unwritable"
    [claim] = find_claims(lab.work)
    assert claim.claim.held and "too_many_crashes could not be published" in claim.claim.held and str(failed) in claim.claim.held
    check_evidence(lab, dropped)  # the only copy is where it was: claimed
    assert daemon.metrics()['idrep_jobs_total{outcome="failed"}'] == 0  # not counted as failed: it is not, yet

    set_read_only(failed, False)
    ended = daemon.wait_for("job_ended", 60, job_id=ghost.job_id, outcome="failed")
    assert ended["code"] == "too_many_crashes"
    lab.wait_until(lambda: find_claims(lab.work) == [], 30, "the claim to be settled")
    assert check_evidence(lab, dropped)["ivan"] == ["failed"]
    assert daemon.terminate() == 0
