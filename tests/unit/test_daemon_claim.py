"""Claims on real files: the atomic claim of an inbox folder, leases, take-over, and races
between real processes (exactly one winner, every time)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.claim import (
    ClaimFence,
    GenerationFence,
    Heartbeat,
    Owner,
    claim_folder,
    claim_path,
    discard,
    empty_trash,
    find_claims,
    next_attempt,
    read_current,
    release,
    renew,
    process_alive,
    process_start,
    take_over,
)
from daemon.clock import ShareClock
from engine import OwnershipLost
from tests.harness.jobs import folder_snapshot
from tests.harness.paths import REPO

A = Owner("daemon-a", "host-a", 101)
B = Owner("daemon-b", "host-b", 202)


def _job_folder(inbox: Path, name: str = "alice") -> Path:
    folder = inbox / name
    folder.mkdir(parents=True)
    (folder / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 100)
    (folder / "job.toml").write_text('[[render]]\nprompt = "x"\n')
    (folder / "READY").write_bytes(b"")
    return folder


def _share_now(tmp_path: Path) -> float:
    return ShareClock(tmp_path / "work", "test").now()


def _age(job, seconds: float) -> None:
    """Make the claim's last renewal `seconds` older on the share's clock (its file's mtime)."""
    path = claim_path(job.container, job.generation)
    info = path.stat()
    os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(process.stdout)


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
    assert on_disk["job_id"] == "20250101T000000Z-abcdef" and on_disk["folder"] == "alice" and on_disk["lease_seconds"] == 30
    assert read_current(job.container).claim == job.claim
    assert job.lease(_share_now(tmp_path)) == "live"


def test_claim_of_a_vanished_folder_leaves_nothing(tmp_path):
    (tmp_path / "work").mkdir()
    assert claim_folder(tmp_path / "inbox" / "gone", tmp_path / "work", "j1", A, 30) is None
    assert list((tmp_path / "work").iterdir()) == []


def test_a_live_claim_is_not_taken_over_an_expired_one_is(tmp_path):
    claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    [seen] = find_claims(tmp_path / "work")
    assert take_over(seen, B, 30, _share_now(tmp_path)) is None
    job = claim_folder(_job_folder(tmp_path / "inbox", "bob"), tmp_path / "work", "j2", A, lease_seconds=30)
    _age(job, 31)  # its owner has not renewed it for 31 s of the share's time
    seen = read_current(job.container)
    assert seen.lease(_share_now(tmp_path)) == "expired"
    taken = take_over(seen, B, 30, _share_now(tmp_path))
    assert taken is not None and taken.generation == 1
    assert taken.claim.daemon_id == "daemon-b" and taken.claim.previous_owner == "daemon-a"
    assert taken.claim.job_id == "j2"  # the same job id: the engine resumes from its ledger
    assert taken.claim.crashes == 1  # the owner never released it: its run ended uncleanly
    assert take_over(seen, A, 30, _share_now(tmp_path)) is None  # a stale view never wins
    assert renew(job) is None  # the old owner finds out at its next renewal
    assert read_current(job.container).claim == taken.claim


def test_leases_are_judged_on_the_shares_clock_not_on_the_hosts(tmp_path):
    """A claim written by a host whose clock runs 2 minutes behind (its wall-clock fields say so)
    is still live: what counts is how long ago the share stamped its last renewal."""
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    behind = replace(job.claim, claimed_at=time.time() - 120)
    claim_path(job.container, 0).write_text(json.dumps(behind.to_json()))
    seen = read_current(job.container)
    assert seen.lease(_share_now(tmp_path)) == "live"
    assert take_over(seen, B, 30, _share_now(tmp_path)) is None
    # ... and a daemon whose clock runs 2 minutes ahead judges it by the same share time.
    assert take_over(seen, B, 30, _share_now(tmp_path) + 0.0) is None


def test_released_claim_is_taken_over_at_once_without_counting_a_crash(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=300)
    assert release(job)
    taken = take_over(read_current(job.container), B, 30, _share_now(tmp_path))
    assert taken is not None and taken.claim.crashes == 0 and not taken.claim.released
    assert not release(job)  # no longer A's to release


def test_a_held_claim_waits_for_its_retry_and_backs_off(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=300)
    assert release(job, held="disk_full: No space left on device (/outbox/.work/j1/prepared/a.png)", retry_seconds=20)
    seen = read_current(job.container)
    assert seen.lease(_share_now(tmp_path)) == "held" and 19 < seen.seconds_left(_share_now(tmp_path)) <= 20
    assert take_over(seen, B, 30, _share_now(tmp_path)) is None  # not before its retry
    _age(seen, 21)
    seen = read_current(job.container)
    assert seen.lease(_share_now(tmp_path)) == "retry"
    taken = take_over(seen, B, 30, _share_now(tmp_path))
    assert taken is not None and taken.claim.crashes == 0 and taken.claim.holds == 1 and not taken.claim.held
    assert release(taken, held="disk_full: again", retry_seconds=40)
    assert read_current(job.container).claim.holds == 2  # held twice in a row: the daemon waits longer
    again = take_over(read_current(job.container), A, 30, _share_now(tmp_path) + 41)
    assert again is not None and release(again)
    assert read_current(job.container).claim.holds == 0  # a run that was not held resets the count


def test_own_claim_is_recovered_at_once_after_a_restart_only_when_its_process_is_dead(tmp_path):
    host = socket.gethostname()
    alive = Owner("daemon-a", host, os.getpid(), process_start(os.getpid()))
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", alive, lease_seconds=300)
    seen = read_current(job.container)
    restarted = Owner("daemon-a", host, 999_999)
    assert take_over(seen, B, 30, _share_now(tmp_path), own_restart=True) is None  # not B's own
    # The recorded process runs (perhaps frozen): a process with the same daemon id waits for the lease.
    assert take_over(seen, restarted, 30, _share_now(tmp_path), own_restart=True) is None
    dead = Owner("daemon-a", host, _dead_pid(), 12345)
    job = claim_folder(_job_folder(tmp_path / "inbox", "bob"), tmp_path / "work", "j2", dead, lease_seconds=300)
    taken = take_over(read_current(job.container), restarted, 30, _share_now(tmp_path), own_restart=True)
    assert taken is not None and taken.claim.pid == 999_999 and taken.generation == 1
    assert process_alive(os.getpid(), process_start(os.getpid())) and not process_alive(os.getpid(), 1)  # a reused pid is not the owner


def test_renew_restamps_the_lease(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    _age(job, 25)
    assert read_current(job.container).lease(_share_now(tmp_path)) == "live"
    assert renew(job) is not None
    assert _share_now(tmp_path) - read_current(job.container).renewed_at < 1


def test_heartbeat_renews_and_reports_a_lost_claim_and_shuts_the_fence(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=0.6)
    lost = []
    clock = ShareClock(tmp_path / "work", "test")
    heartbeat = Heartbeat(0.6, lost.append, clock.now)
    heartbeat.start()
    try:
        fence = heartbeat.hold(job)
        time.sleep(1.0)  # several beats: the lease never lapses
        assert read_current(job.container).lease(clock.now()) == "live"
        fence.check("a write")  # open
        _age(read_current(job.container), 10)  # B takes it over (as if A had been frozen past its lease)...
        assert take_over(read_current(job.container), B, 30, clock.now()) is not None
        with pytest.raises(OwnershipLost):
            fence.check("the next write")  # ... A's very next write is refused ...
        deadline = time.monotonic() + 3
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [j.job_id for j in lost] == ["j1"]  # ... and its heartbeat hears of it
        assert heartbeat.drop(job.container) is None
    finally:
        heartbeat.stop()


def test_a_fence_shuts_when_its_lease_lapses_unrenewed(tmp_path):
    """No heartbeat (a frozen process): the fence shuts by the local clock alone, before anyone took over."""
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=0.5)
    fence = ClaimFence(job, 0.5, renew_now=lambda: False)
    fence.check("a write")
    time.sleep(0.5)
    with pytest.raises(OwnershipLost, match="ran out"):
        fence.check("a write after a freeze", io=False)
    with pytest.raises(OwnershipLost):
        fence.check("and every one after it")


def test_a_slow_heartbeat_costs_nothing_the_fence_renews_a_fresh_claim_itself(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=1.0)
    clock = ShareClock(tmp_path / "work", "test")
    heartbeat = Heartbeat(1.0, lambda job: None, clock.now)  # never started: its beats are late
    fence = heartbeat.hold(job)
    time.sleep(0.6)  # past half the lease with no renewal: the heartbeat is late
    fence.check("a write")  # renewed on the spot
    assert clock.now() - read_current(job.container).renewed_at < 0.2
    time.sleep(0.6)
    fence.check("a write")  # and again: 1.2 s after the claim, well past its lease of 1 s
    _age(read_current(job.container), 5)  # too old on the share: another daemon may have judged it expired
    time.sleep(0.92)
    with pytest.raises(OwnershipLost):
        fence.check("a write")


def test_a_renewal_the_fence_makes_inside_a_guarded_write_does_not_ask_the_fence_again(tmp_path):
    """The engine writes under the fence (engine.fsutil.guarded_writes); when a write finds the
    lease due, the fence renews on the spot, and that renewal's own write of the claim file must
    not ask the fence again: it did, and the fence renewed again, until a RecursionError failed
    the job as an internal error (seen in the three-daemon test on a loaded machine)."""
    from engine.fsutil import atomic_write_bytes, guarded_writes

    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=1.0)
    clock = ShareClock(tmp_path / "work", "test")
    heartbeat = Heartbeat(1.0, lambda job: None, clock.now)  # never started: the fence renews itself
    fence = heartbeat.hold(job)
    time.sleep(0.6)  # past half the lease
    with guarded_writes(fence.check):
        atomic_write_bytes(tmp_path / "output.bin", b"evidence")  # renews, once, then writes
    assert clock.now() - read_current(job.container).renewed_at < 0.2
    assert (tmp_path / "output.bin").read_bytes() == b"evidence"


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
    from daemon.clock import ShareClock
    work, rounds, me = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    owner = Owner(me, "host", 0)
    clock = ShareClock(work, me)
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
                won = take_over(seen, owner, 30, clock.now()) is not None
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


def test_each_attempt_takes_the_next_generation_and_shuts_the_lost_attempts_fences(tmp_path):
    """The Ray backend's retry: the holder takes generation N+1 (a crash on the count) for the
    next attempt; the lost attempt's worker fence (GenerationFence) and the holder's own fence
    for generation N refuse from then on, and so does a holder that is no longer the owner."""
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    clock = ShareClock(tmp_path / "work", "test")
    heartbeat = Heartbeat(30, lambda job: None, clock.now)  # never started: holds and hands out fences only
    own = heartbeat.hold(job)
    worker = GenerationFence(job.container, job.generation, look_seconds=0.0)
    worker.check("an attempt's write")
    worker.check("a denoising step", io=False)
    retry = next_attempt(job, A, 30)
    assert retry is not None and retry.generation == 1 and retry.claim.crashes == 1 and retry.claim.previous_owner == "daemon-a"
    with pytest.raises(OwnershipLost, match="generation 1 exists"):
        worker.check("the lost attempt's next write")
    with pytest.raises(OwnershipLost):
        worker.check("and every one after it", io=False)
    heartbeat.hold(retry)
    with pytest.raises(OwnershipLost, match="superseded"):
        own.check("the holder's write for generation 0")
    GenerationFence(retry.container, retry.generation).check("the retry's write")
    assert next_attempt(job, A, 30) is None  # generation 0 is not the owner any more: no generation is taken from it
    assert heartbeat.drop(job.container) == retry
    discard(retry.container, tmp_path / "work")
    with pytest.raises(OwnershipLost, match="container is gone"):
        GenerationFence(retry.container, retry.generation).check("a write after the job was settled")


def test_a_worker_fence_looks_at_the_disk_between_writes_only_every_few_seconds(tmp_path):
    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=30)
    fence = GenerationFence(job.container, 0, look_seconds=3600)
    assert next_attempt(job, A, 30) is not None
    fence.check("a denoising step", io=False)  # not looked yet: the step goes on (it writes nothing)
    with pytest.raises(OwnershipLost):
        fence.check("a write")


def test_a_renewal_on_a_full_disk_writes_the_claims_same_bytes_in_place(tmp_path):
    """An atomic rewrite needs a new file, which a full disk refuses; the renewal writes the same
    bytes over the file instead (no new block), and the file system still stamps its mtime."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        job = claim_folder(_job_folder(disk / "inbox"), disk / "work", "j1", A, lease_seconds=30)
        claim_file = job.container / "claim.000000.json"
        before = claim_file.read_bytes()
        with open(disk / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == 28
        _age(job, 25)
        assert renew(job) is not None
        assert claim_file.read_bytes() == before and sorted(p.name for p in job.container.iterdir()) == ["alice", "claim.000000.json"]
        assert _share_now(tmp_path) - read_current(job.container).renewed_at < 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_lease_that_ran_out_on_a_disk_fault_says_so_and_one_taken_over_does_not(tmp_path):
    import errno

    job = claim_folder(_job_folder(tmp_path / "inbox"), tmp_path / "work", "j1", A, lease_seconds=0.5)
    fence = ClaimFence(job, 0.5, renew_now=lambda: False)
    fence.renew_failed(OSError(errno.EROFS, os.strerror(errno.EROFS), str(job.container / "claim.000000.json")))
    time.sleep(0.5)
    with pytest.raises(OwnershipLost, match="disk fault"):
        fence.check("a write", io=False)
    assert fence.lapsed_on.startswith("outbox_unwritable: Read-only file system")
    # A renewal that worked clears the fault: a lease that then runs out is no disk fault's doing.
    other = ClaimFence(job, 0.5, renew_now=lambda: False)
    other.renew_failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x"))
    other.renewed(0.0)  # a renewal went through (started long ago: the lease is not extended)
    time.sleep(0.5)
    with pytest.raises(OwnershipLost, match="renewal overdue"):
        other.check("a write", io=False)
    assert other.lapsed_on == ""
