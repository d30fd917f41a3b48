"""Claims on real files: the atomic claim of an inbox folder, leases, take-over, and races
between real processes (exactly one winner, every time)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from daemon.claim import (
    Heartbeat,
    Owner,
    claim_folder,
    claim_path,
    discard,
    empty_trash,
    find_claims,
    read_current,
    release,
    renew,
    take_over,
)
from tests.conftest import REPO, folder_snapshot

A = Owner("daemon-a", "host-a", 101)
B = Owner("daemon-b", "host-b", 202)


def _job_folder(inbox: Path, name: str = "alice") -> Path:
    folder = inbox / name
    folder.mkdir(parents=True)
    (folder / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 100)
    (folder / "job.toml").write_text('[[render]]\nprompt = "x"\n')
    (folder / "READY").write_bytes(b"")
    return folder


def test_claim_moves_the_folder_unchanged_and_writes_the_claim_beside_it(tmp_path):
    source = _job_folder(tmp_path / "inbox")
    before = folder_snapshot(source)
    job = claim_folder(source, tmp_path / "work", "20250101T000000Z-abcdef", A, lease_seconds=30)
    assert job is not None and job.generation == 0
    assert not source.exists()
    assert job.container == tmp_path / "work" / "alice.20250101T000000Z-abcdef"
    assert folder_snapshot(job.folder) == before  # nothing added inside the job folder
    assert sorted(p.name for p in job.container.iterdir()) == ["alice", "claim.000000.json"]
    on_disk = json.loads(claim_path(job.container, 0).read_text())
    assert on_disk["daemon_id"] == "daemon-a" and on_disk["host"] == "host-a" and on_disk["pid"] == 101
    assert on_disk["job_id"] == "20250101T000000Z-abcdef" and on_disk["folder"] == "alice"
    assert 29 < on_disk["lease_expires_at"] - time.time() <= 30
    assert read_current(job.container).claim == job.claim


def test_claim_of_a_vanished_folder_leaves_nothing(tmp_path):
    (tmp_path / "work").mkdir()
    assert claim_folder(tmp_path / "inbox" / "gone", tmp_path / "work", "j1", A, 30) is None
    assert list((tmp_path / "work").iterdir()) == []


def test_a_live_claim_is_not_taken_over_an_expired_one_is(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    [seen] = find_claims(tmp_path / "work")
    assert take_over(seen, B, 30) is None
    job = claim_folder(_job_folder(tmp_path / "inbox", "bob"), tmp_path / "work", "j2", A, lease_seconds=0.2)
    time.sleep(0.3)
    seen = read_current(job.container)
    taken = take_over(seen, B, 30)
    assert taken is not None and taken.generation == 1
    assert taken.claim.daemon_id == "daemon-b" and taken.claim.previous_owner == "daemon-a"
    assert taken.claim.job_id == "j2"  # the same job id: the engine resumes from its ledger
    assert taken.claim.crashes == 1  # the owner never released it: its run ended uncleanly
    assert take_over(seen, A, 30) is None  # a stale view never wins
    assert renew(job, 30) is None  # the old owner finds out at its next renewal
    assert read_current(job.container).claim == taken.claim


def test_released_claim_is_taken_over_at_once_without_counting_a_crash(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=300)
    assert release(job)
    taken = take_over(read_current(job.container), B, 30)
    assert taken is not None and taken.claim.crashes == 0 and not taken.claim.released
    assert not release(job)  # no longer A's to release


def test_own_claim_is_recovered_at_once_after_a_restart_others_are_not(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=300)
    seen = read_current(job.container)
    assert take_over(seen, B, 30, own_restart=True) is None
    restarted = Owner("daemon-a", "host-a", 999)
    taken = take_over(seen, restarted, 30, own_restart=True)
    assert taken is not None and taken.claim.pid == 999 and taken.generation == 1


def test_renew_extends_the_lease(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=1)
    renewed = renew(job, 100)
    assert renewed is not None and renewed.claim.lease_expires_at > job.claim.lease_expires_at + 50
    assert read_current(job.container).claim.lease_expires_at == renewed.claim.lease_expires_at


def test_heartbeat_renews_and_reports_a_lost_claim(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=0.6)
    lost = []
    heartbeat = Heartbeat(0.6, lost.append)
    heartbeat.start()
    try:
        heartbeat.hold(job)
        time.sleep(1.0)  # several beats: the lease never lapses
        current = read_current(job.container)
        assert not current.claim.expired(time.time())
        assert current.claim.lease_expires_at > job.claim.lease_expires_at
        # B takes it over by force (as if A had been frozen past its lease)...
        forced = current.claim.__class__(**{**current.claim.__dict__, "lease_expires_at": 0.0})
        claim_path(job.container, 0).write_text(json.dumps(forced.to_json()))
        assert take_over(read_current(job.container), B, 30) is not None
        deadline = time.monotonic() + 3
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [j.job_id for j in lost] == ["j1"]  # ... and A hears of it
        assert heartbeat.drop() is None
    finally:
        heartbeat.stop()


def test_discard_removes_the_container_in_one_step(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, 30)
    discard(job.container, tmp_path / "work")
    assert find_claims(tmp_path / "work") == []
    (tmp_path / "work" / ".trash" / "half-removed" / "x").mkdir(parents=True)
    empty_trash(tmp_path / "work")
    assert list((tmp_path / "work" / ".trash").iterdir()) == []


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from daemon.claim import Owner, claim_folder, read_current, take_over
    work, rounds, me = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    owner = Owner(me, "host", 0)
    print("ready", flush=True)
    start = float(sys.stdin.readline())  # the same instant for every racer, sent once all are ready
    for mode in ("claim", "takeover"):
        for number in range(rounds):
            while time.time() < start:
                time.sleep(0.0005)
            start += 0.1
            if mode == "claim":  # everyone claims inbox/job<n> at once
                won = claim_folder(work.parent / "inbox" / f"job{number}", work, f"{me}-{number}", owner, 0.0) is not None
            else:  # everyone takes over the (expired) claim of job<n> at once
                [seen] = [job for job in map(read_current, work.iterdir()) if job.claim and job.claim.folder == f"job{number}"]
                won = take_over(seen, owner, 30) is not None
            print(json.dumps({"mode": mode, "round": number, "won": won, "me": me}), flush=True)
""")
ROUNDS = 8


@pytest.fixture(scope="module")
def race(tmp_path_factory) -> tuple[Path, dict[str, bytes], list[dict]]:
    """Four racer processes: each claims inbox/job0..7 at the same instants (leases of 0 s, so
    every claim is expired at once), then each takes over every one of them at the same instants.
    Imports first, then one common start time, so the races are real."""
    root = tmp_path_factory.mktemp("race")
    work = root / "work"
    work.mkdir()
    snapshots = {f"job{n}": folder_snapshot(_job_folder(root / "inbox", f"job{n}")) for n in range(ROUNDS)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(work), str(ROUNDS), f"racer{i}"], cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
    start = time.time() + 0.3
    results = []
    for racer in racers:
        out, err = racer.communicate(f"{start}\n", timeout=120)
        assert racer.returncode == 0, err
        results += [json.loads(line) for line in out.splitlines()]
    return root, snapshots, results


def test_racing_claims_of_inbox_folders_have_exactly_one_winner(race):
    root, snapshots, results = race
    winners = Counter(r["round"] for r in results if r["mode"] == "claim" and r["won"])
    assert winners == {number: 1 for number in range(ROUNDS)}
    assert list((root / "inbox").iterdir()) == []
    jobs = find_claims(root / "work")
    assert len(jobs) == ROUNDS  # the losers left no empty containers behind
    for job in jobs:
        assert folder_snapshot(job.folder) == snapshots[job.claim.folder]


def test_racing_takeovers_have_exactly_one_winner(race):
    root, _, results = race
    winners = Counter(r["round"] for r in results if r["mode"] == "takeover" and r["won"])
    assert winners == {number: 1 for number in range(ROUNDS)}
    for job in find_claims(root / "work"):
        assert job.generation == 1 and job.claim.daemon_id.startswith("racer")
        assert {p.name for p in job.container.iterdir()} == {job.claim.folder, "claim.000000.json", "claim.000001.json"}
