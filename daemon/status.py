"""`python -m daemon status`: what the daemons sharing an inbox are doing, read from the folders.

It needs no running daemon and talks to none: it reads the same folders they share, so it
works from any host that mounts them, and it changes nothing.
- queue: the inbox's job folders, ready (a READY file, or job.toml and nothing changed for
  `stable_seconds` by the files' times) or still being copied;
- claims: every job in the work area, the daemon holding it (id, host, pid) and its lease:
  live, expired (the next daemon to scan takes it over and resumes it) or released;
- progress of each claimed job: stage, phase or images done, last event (the engine's ledger
  and audit log in <outbox>/.work, read by engine.status);
- the last N results, with lock state or failure code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.claim import ClaimedJob, find_claims
from daemon.watch import READY_MARKER, folder_signature, list_inbox
from engine.job import JOB_FILE
from engine.status import Running, Status, format_results, outbox_status, stage_position


@dataclass
class Waiting:
    folder: str
    ready: bool
    why: str  # "READY file", "unchanged for 42 s", "no job.toml yet", "changed 3 s ago"


@dataclass
class HeldClaim:
    folder: str
    job_id: str
    daemon_id: str | None  # None: no readable claim file (being created or discarded)
    host: str | None
    pid: int | None
    lease: str  # live | expired | released | unknown
    lease_seconds_left: float | None  # negative: expired that long ago
    crashes: int
    progress: Running | None  # the engine's view of the job, when it has started


@dataclass
class DaemonStatus:
    inbox: Path
    work: Path
    waiting: list[Waiting] = field(default_factory=list)
    claims: list[HeldClaim] = field(default_factory=list)
    engine: Status | None = None  # results (and in-progress jobs) from the outbox

    def to_plain(self) -> dict[str, Any]:
        return {"inbox": str(self.inbox), "work": str(self.work), "waiting": [vars(w) for w in self.waiting],
                "claims": [{**vars(c), "progress": None if c.progress is None else vars(c.progress)} for c in self.claims],
                "results": [] if self.engine is None else [vars(r) for r in self.engine.results]}


def daemon_status(inbox: Path, work: Path, outbox: Path, failed: Path, *, stable_seconds: float, last: int = 10,
                  now: float | None = None) -> DaemonStatus:
    """The shared folders' state at wall-clock `now` (default: the current time)."""
    now = time.time() if now is None else now
    status = DaemonStatus(inbox=Path(inbox), work=Path(work))
    if status.inbox.is_dir():
        for name in sorted(list_inbox(status.inbox)):
            signature = folder_signature(status.inbox / name)
            if signature is not None:
                status.waiting.append(_waiting(name, signature, stable_seconds, now))
    engine = outbox_status(Path(outbox), failed=Path(failed), last=last)
    status.engine = engine
    running = {job.job_id: job for job in engine.running}
    if status.work.is_dir():
        for job in find_claims(status.work):
            status.claims.append(_held(job, running.get(job.job_id), now))
    return status


def _waiting(name: str, signature: tuple[tuple[str, int, int], ...], stable_seconds: float, now: float) -> Waiting:
    top = {path for path, _, _ in signature if "/" not in path}
    if READY_MARKER in top:
        return Waiting(name, True, f"{READY_MARKER} file")
    newest = max((mtime_ns for _, _, mtime_ns in signature), default=0) / 1e9
    quiet = now - newest
    if JOB_FILE not in top:
        return Waiting(name, False, f"no {JOB_FILE} yet")
    if quiet >= stable_seconds:
        return Waiting(name, True, f"unchanged for {quiet:.0f} s")
    return Waiting(name, False, f"changed {max(quiet, 0):.0f} s ago; ready after {stable_seconds:g} s unchanged")


def _held(job: ClaimedJob, progress: Running | None, now: float) -> HeldClaim:
    claim = job.claim
    if claim is None:
        return HeldClaim(folder="?", job_id=job.job_id, daemon_id=None, host=None, pid=None, lease="unknown",
                         lease_seconds_left=None, crashes=0, progress=progress)
    lease = "released" if claim.released else ("expired" if claim.expired(now) else "live")
    return HeldClaim(folder=claim.folder, job_id=claim.job_id, daemon_id=claim.daemon_id, host=claim.host, pid=claim.pid, lease=lease,
                     lease_seconds_left=round(claim.lease_expires_at - now, 1), crashes=claim.crashes, progress=progress)


def format_daemon_status(status: DaemonStatus) -> str:
    """The status as lines for a terminal."""
    ready = [w for w in status.waiting if w.ready]
    out = [f"inbox {status.inbox}: {len(status.waiting)} folder(s), {len(ready)} ready, {len(status.waiting) - len(ready)} still copying"]
    out += [f"  {'ready  ' if w.ready else 'copying'}  {w.folder}  ({w.why})" for w in status.waiting[:20]]
    if len(status.waiting) > 20:
        out.append(f"  ... {len(status.waiting) - 20} more")
    out.append("")
    out.append(f"claimed in {status.work}: {len(status.claims) or 'none'}")
    for claim in status.claims:
        if claim.daemon_id is None:
            out.append(f"  {claim.job_id}  no readable claim file (being claimed or removed)")
            continue
        if claim.lease == "live":
            lease = f"lease live, {claim.lease_seconds_left:.0f} s left"
        elif claim.lease == "expired":
            lease = f"LEASE EXPIRED {-(claim.lease_seconds_left or 0):.0f} s ago: the next daemon to scan takes it over and resumes it"
        else:
            lease = "released by a clean stop: the next daemon to scan resumes it"
        crashes = f", {claim.crashes} crashed run(s)" if claim.crashes else ""
        out.append(f"  {claim.folder}  {claim.job_id}  held by {claim.daemon_id} (host {claim.host}, pid {claim.pid}); {lease}{crashes}")
        if claim.progress is not None:
            job = claim.progress
            out.append(f"      stage {stage_position(job)}, {job.state}" + (f": {job.detail}" if job.detail else ""))
        else:
            out.append("      not started by the engine yet")
    out.append("")
    out += format_results(status.engine.results if status.engine is not None else [])
    return "\n".join(out) + "\n"
