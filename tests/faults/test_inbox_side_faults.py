"""The inbox side of the share: the file system holding the inbox and the work area (the claims)
fills up or turns read-only while a job runs, and folders of the inbox that this daemon may not
read. What must hold: a disk fault there is a hold, never a crash (with max_crashes = 1 a single
crash counted would give the job up into failed/); one bad folder never stalls the others.

Real faults only: the inbox and the work area are on a tmpfs of their own, filled to the last byte
and remounted read-only; the daemon runs as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
(setpriv), as the container's user runs, beside folders of another uid kept to themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from daemon.claim import find_claims
from tests.harness.paths import REPO
from tests.harness.lab import FAST_JOB, drop_job, photo_bytes
from tests.harness.faults import check_evidence, drops_of, filled, locations, outcomes, set_read_only, tmpfs

LEASE = 1.0
TRAINING_JOB = FAST_JOB.replace("[train]\nmax_steps = 1", "[train]\nmax_steps = 10\ncheckpoint_every = 5")


def test_a_full_then_read_only_inbox_share_holds_the_running_job_and_counts_no_crash(lab):
    share = tmpfs(lab.root / "share", "24m")
    lab.inbox, lab.work = share / "inbox", share / "work"
    lab.configure(inbox=str(lab.inbox), work=str(lab.work), lease_seconds=LEASE, scan_seconds=0.5, hold_retry_seconds=0.3,
                  max_crashes=1, daemon_id="gpu-0")
    marker = lab.root / "paused-in-training"
    daemon = lab.start(env={"ENGINE_PAUSE_AT": "train:checkpoint:5", "ENGINE_PAUSE_FILE": str(marker), "ENGINE_PAUSE_MODE": "hold"})
    dropped = {"alice": drops_of(drop_job(lab.inbox, "alice", job_toml=TRAINING_JOB, photos={"photo.png": photo_bytes()}))}
    lab.wait_until(marker.exists, 300, "training to reach its step-5 checkpoint")
    [claim] = find_claims(lab.work)

    # Full, three times for four leases each, while the job holds its claim: the renewals go on
    # (the claim's same bytes written in place need no new block), nothing lapses.
    for _ in range(3):
        mark = daemon.mark()
        with filled(share):
            renewed = os.stat(lab.work / claim.container.name / "claim.000000.json").st_mtime
            time.sleep(4 * LEASE)
            assert os.stat(lab.work / claim.container.name / "claim.000000.json").st_mtime > renewed
        assert daemon.named("claim_renew_failed", after=mark) == [] and daemon.named("claim_lost", after=mark) == []
        [now] = find_claims(lab.work)
        assert (now.generation, now.claim.crashes) == (0, 0)

    # Read-only for four leases while the job runs on: the renewals fail, the lease runs out, the
    # job stops as lost; claiming pauses naming the share; once it takes writes again the claim is
    # recorded as held, taken over without a crash, and the job resumes and finishes once.
    mark = daemon.mark()
    set_read_only(share, True)
    marker.unlink()
    lapsed = daemon.wait_for("lease_lapsed_on_disk_fault", 60, after=mark)
    assert "Read-only file system" in lapsed["fault"], lapsed
    paused = daemon.wait_for("claiming_paused", 30, after=mark)
    assert any(str(share) in problem for problem in paused["problems"]), paused
    assert daemon.metrics()["idrep_ready"] == 0
    time.sleep(4 * LEASE)
    set_read_only(share, False)
    recorded = daemon.wait_for("lapsed_claim_recorded", 30, after=mark)
    assert recorded["released"] is True
    taken = daemon.wait_for("claim_taken_over", 30, after=mark)
    assert (taken["reason"], taken["crashes"]) == ("held", 0), taken
    assert daemon.wait_for("job_ended", 300, after=mark, folder="alice", outcome="finished")
    lab.wait_until(lambda: find_claims(lab.work) == [], 30, "the claim to be settled")

    ended = outcomes(daemon)
    assert ended["crashed"] == 0 and ended["finished"] == 1 and ended["lost"] == 1, ended
    assert len(lab.finished_jobs()["alice"]) == 1
    metrics = daemon.metrics()
    assert metrics['idrep_jobs_total{outcome="crashed"}'] == 0 and metrics["idrep_claim_lapses_total"] == 1
    assert metrics['idrep_claims_taken_over_total{reason="expired"}'] == 0 and metrics["idrep_ready"] == 1
    assert check_evidence(lab, dropped)["alice"] == ["outbox"]
    assert daemon.terminate() == 0


def test_a_job_that_ends_while_the_inbox_share_is_read_only_keeps_its_claim_until_it_can_be_settled(lab):
    """Published, then the claimed folder cannot be removed (the share turned read-only): the
    claim stays this daemon's and the settling is tried again until the share takes writes; no
    crash, no takeover, and the dropped files are in the claimed folder and the outbox meanwhile."""
    share = tmpfs(lab.root / "share", "24m")
    lab.inbox, lab.work = share / "inbox", share / "work"
    lab.configure(inbox=str(lab.inbox), work=str(lab.work), lease_seconds=LEASE, scan_seconds=0.5, max_crashes=1, daemon_id="gpu-0")
    marker = lab.root / "published"
    daemon = lab.start(env={"ENGINE_PAUSE_AT": "job:published", "ENGINE_PAUSE_FILE": str(marker), "ENGINE_PAUSE_MODE": "hold"})
    dropped = {"alice": drops_of(drop_job(lab.inbox, "alice", photos={"photo.png": photo_bytes()}))}
    lab.wait_until(marker.exists, 300, "the job to be published")
    mark = daemon.mark()
    set_read_only(share, True)
    marker.unlink()
    refused = daemon.wait_for("claim_not_settled", 60, after=mark)
    assert refused["outcome"] == "finished" and "Read-only file system" in refused["error"], refused
    assert daemon.wait_for("job_ended", 30, after=mark, folder="alice")["outcome"] == "finished"
    assert sorted(kind for kind, _ in locations(lab)["alice"]) == ["claimed", "outbox"]  # both copies, byte for byte below
    time.sleep(4 * LEASE)
    set_read_only(share, False)
    assert daemon.wait_for("claim_settled", 60, after=mark)["outcome"] == "finished"
    lab.wait_until(lambda: find_claims(lab.work) == [], 30, "the claim to be settled")
    ended = outcomes(daemon)
    assert ended == {"finished": 1}, ended
    metrics = daemon.metrics()
    assert metrics['idrep_jobs_total{outcome="crashed"}'] == 0 and sum(v for k, v in metrics.items() if k.startswith("idrep_claims_taken_over_total")) == 0
    assert check_evidence(lab, dropped)["alice"] == ["outbox"]
    assert daemon.terminate() == 0


def _without_read_override() -> tuple[str, ...]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the read-override capabilities")
    drop = "-dac_override,-dac_read_search"
    prefix = ("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}")
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv refused here")
    return prefix


def test_folders_it_may_not_read_are_skipped_and_named_while_a_good_job_beside_them_runs(lab):
    prefix = _without_read_override()
    lab.configure(daemon_id="gpu-0")
    photo = photo_bytes()
    locked_dir = drop_job(lab.inbox, "locked-dir", photos={"photo.png": photo})
    (locked_dir / "raw").mkdir()
    (locked_dir / "raw" / "original.png").write_bytes(photo)
    os.chown(locked_dir / "raw", 4321, 4321)
    os.chmod(locked_dir / "raw", 0o700)
    locked_photo = drop_job(lab.inbox, "locked-photo", photos={"photo.png": photo})
    os.chown(locked_photo / "photo.png", 4321, 4321)
    os.chmod(locked_photo / "photo.png", 0o600)
    dropped = {name: drops_of(lab.inbox / name) for name in ("locked-dir", "locked-photo")}
    daemon = lab.start(prefix=prefix)
    dropped["good"] = drops_of(drop_job(lab.inbox, "good", photos={"photo.png": photo}))
    assert daemon.wait_for("job_ended", 300, folder="good")["outcome"] == "finished"

    unreadable = daemon.wait_for("inbox_folder_unreadable", 30, folder="locked-dir")
    assert "raw: Permission denied (owner uid 4321, mode 0700)" in unreadable["why"], unreadable
    refused = daemon.wait_for("job_refused", 30, folder="locked-photo", code="input_unreadable")
    assert "photo.png: Permission denied (owner uid 4321, mode 0600)" in refused["why"], refused
    time.sleep(2)  # scans and walks go on: each is said once, neither is claimed, moved or retried
    assert len(daemon.named("inbox_folder_unreadable")) == 1 and len(daemon.named("job_refused")) == 1
    assert daemon.named("file_system_error") == [] and daemon.named("job_held") == []
    assert daemon.metrics()["idrep_inbox_unreadable"] == 2
    places = check_evidence(lab, dropped)
    assert places == {"good": ["outbox"], "locked-dir": ["inbox"], "locked-photo": ["inbox"]}, places

    status = subprocess.run([*prefix, sys.executable, "-m", "daemon", "status", "--config", str(lab.config), "--json"],
                            capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert status.returncode == 0, status.stderr
    ignored = {entry["folder"]: entry["why"] for entry in json.loads(status.stdout)["ignored"]}
    assert ignored["locked-dir"].startswith("unreadable: raw: Permission denied") and "input_unreadable: photo.png" in ignored["locked-photo"]

    # Made readable (no mtime moves: a chmod), the refused one starts by itself.
    os.chmod(locked_photo / "photo.png", 0o644)
    assert daemon.wait_for("job_ended", 300, folder="locked-photo")["outcome"] == "finished"
    assert daemon.terminate() == 0
