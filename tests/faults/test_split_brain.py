"""Split brain: two daemons must never both run one job, whatever their clocks say or however long
one of them was frozen. It was: a daemon frozen (SIGSTOP) past its lease and then resumed finished
and published a job another daemon had taken over, both appending to one audit.jsonl from their
own heads (a forked chain, the same job id also in failed/); a daemon whose clock ran 120 s ahead
took a live claim for expired; a second process started with the same daemon_id took the first
one's claims as its own.

One scenario, in order:
1. daemon A runs a job and is held (ENGINE_PAUSE_MODE=hold) right after its train stage wrote its
   outputs, just before the stage's audit line and ledger commit: the worst moment to lose it;
2. daemon B starts with its clock 120 s ahead (libfaketime) and must leave A's live claim alone,
   for several leases, and say `clock_skew`;
3. A is frozen (SIGSTOP) with its pause lifted; a process started with A's daemon id is refused
   (A's pid is alive, if frozen); B takes the job over only once A's lease has run out on the
   share's clock, resumes it and publishes it;
4. A wakes (SIGCONT) exactly where it was, about to write: it writes nothing, ends the run as
   "lost", and stops cleanly when asked.
The published job has one unforked chain whose fence never goes back, train's audit line once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from daemon.claim import find_claims
from tests.harness.lab import FAST_JOB, audit_events, drop_job, parse_ts
from tests.harness.faults import check_evidence, drops_of, faketime_library, outcomes

LEASE = 2.5
SKEW = 120


def test_a_frozen_daemon_writes_nothing_after_a_skewed_daemon_takes_its_job_when_and_only_when_its_lease_ran_out(lab):
    lab.configure(lease_seconds=LEASE, scan_seconds=0.5)
    marker = lab.root / "a-paused"
    a = lab.start("--daemon-id", "gpu-a", name="a",
                  env={"ENGINE_PAUSE_AT": "stage:train:written", "ENGINE_PAUSE_MODE": "hold", "ENGINE_PAUSE_FILE": str(marker)})
    job = FAST_JOB.replace("[train]\nmax_steps = 1", "[train]\nmax_steps = 3")
    dropped = {"kim": drops_of(drop_job(lab.inbox, "kim", job_toml=job))}
    claimed = a.wait_for("job_claimed", 60, folder="kim")
    lab.wait_until(marker.exists, 120, "A to reach the end of its train stage")

    library = faketime_library()
    skew_env = {"LD_PRELOAD": library, "FAKETIME": f"+{SKEW}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"} if library else {}
    b = lab.start("--daemon-id", "gpu-b", "--poll", name="b", env=skew_env)
    if library:
        skew = b.wait_for("clock_skew", 30)
        assert SKEW - 5 < skew["seconds"] < SKEW + 5, skew
    time.sleep(3 * LEASE)  # B scans every 0.5 s: A's claim is live on the share's clock the whole time
    assert b.named("claim_taken_over") == [] and a.process.poll() is None
    [claim] = find_claims(lab.work)
    assert claim.generation == 0 and claim.claim.daemon_id == "gpu-a"

    a.process.send_signal(signal.SIGSTOP)
    frozen_at = time.time()
    marker.unlink()  # A goes on from the pause the moment it is woken
    twin = lab.start("--daemon-id", "gpu-a", name="twin", wait=False)
    assert twin.wait(90) == 2, twin.tail()
    assert "in use by a running process" in twin.named("refused_to_start")[0]["message"]

    taken = b.wait_for("claim_taken_over", 60, job_id=claimed["job_id"])
    assert taken["reason"] == "expired" and taken["previous_owner"] == "gpu-a"
    assert parse_ts(taken) - frozen_at >= LEASE * 2 / 3 - 0.2  # not before the lease ran out (A renewed at most lease/3 before)
    assert b.wait_for("job_ended", 120, job_id=claimed["job_id"])["outcome"] == "finished"

    a.process.send_signal(signal.SIGCONT)
    ended = a.wait_for("job_ended", 60, job_id=claimed["job_id"])
    assert ended["outcome"] == "lost", ended
    assert a.named("job_ownership_lost") or a.named("claim_lost")
    assert a.terminate() == 0

    [job_dir] = lab.finished_jobs()["kim"]
    events = audit_events(job_dir)
    fences = [e["fence"] for e in events]
    assert fences == sorted(fences) and fences[-1] == 1, fences  # A (0) never wrote after B (1) began
    names = Counter(e["event"] for e in events)
    assert names["job_finished"] == 1 and names["job_started"] == 1 and names["job_resumed"] == 1
    assert [e["stage"] for e in events if e["event"] == "stage_finished"].count("train") == 1
    assert all(e["prev"] == before["hash"] for before, e in zip(events, events[1:]))
    places = check_evidence(lab, dropped)
    assert places == {"kim": ["outbox"]}
    assert not (lab.failed.exists() and any(lab.failed.iterdir()))
    assert outcomes(a, b) == Counter({"finished": 1, "lost": 1})
    assert b.terminate() == 0
    if not library:
        pytest.skip("libfaketime (Debian's faketime) is not installed: the frozen daemon was checked, the skewed clock was not")
