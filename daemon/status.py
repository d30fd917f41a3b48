"""`python -m daemon status`: what the daemons sharing an inbox are doing, read from the folders.

It needs no running daemon and talks to none: it reads the same folders they share, so it
works from any host that mounts them, and it changes nothing.
- queue: the inbox's job folders, ready (a READY file, or job.toml and nothing changed for
  `stable_seconds` by the files' times) or still being copied; folders with a temporary name
  (`x.part`, `x.tmp`, `~x`), which are never taken for jobs; mount points refused once; folders
  that cannot be read, or whose files cannot be (input_unreadable), by the user running this
  (run it as the daemon's user to see what the daemon skips);
- claims: every job in the work area, the daemon holding it (id, host, pid) and its lease, on
  the share's clock: live, expired (the next daemon to scan takes it over and resumes it),
  released, or held (the disk, share or permissions failed it: why, and when it is retried);
  with the Ray backend also the node and worker process running the claim's current attempt;
- progress of each claimed job: stage, phase or images done, last event (the engine's ledger
  and audit log in <outbox>/.work, read by engine.status);
- the last N results, with lock state or failure code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.claim import REFUSED_DIR, ClaimedJob, find_claims, worker_record
from daemon.clock import ShareClock
from daemon.watch import READY_MARKER, describe_unreadable, folder_signature, list_inbox, list_temporary, unreadable_files
from engine.jobfolder import JOB_FILE
from engine.status import Running, Status, format_results, outbox_status, stage_position


@dataclass
class Waiting:
    folder: str
    ready: bool
    why: str  # "READY file", "unchanged for 42 s", "no job.toml yet", "waiting for job.toml: ...", "changed 3 s ago"


@dataclass
class HeldClaim:
    folder: str
    job_id: str
    daemon_id: str | None  # None: no readable claim file (being created or discarded)
    host: str | None
    pid: int | None
    lease: str  # live | expired | released | held | retry (held, and due) | unknown
    lease_seconds_left: float | None  # live: until it expires (negative: expired that long ago); held: until its retry
    crashes: int
    progress: Running | None  # the engine's view of the job, when it has started
    held: str = ""  # why the job is on hold
    holds: int = 0
    generation: int = -1  # the claim's generation: one more for each takeover and each attempt retried on another node
    node: str = ""  # Ray backend: the node (address) running this generation's attempt, and its worker's pid
    worker_pid: int | None = None


@dataclass
class DaemonStatus:
    inbox: Path
    work: Path
    waiting: list[Waiting] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (folder, why) never taken for jobs
    claims: list[HeldClaim] = field(default_factory=list)
    engine: Status | None = None  # results (and in-progress jobs) from the outbox
    clock: str = "share"  # share: leases judged on the work area's clock | host: on this host's (the share could not be written)

    def to_plain(self) -> dict[str, Any]:
        return {"inbox": str(self.inbox), "work": str(self.work), "waiting": [vars(w) for w in self.waiting],
                "ignored": [{"folder": f, "why": w} for f, w in self.ignored], "clock": self.clock,
                "claims": [{**vars(c), "progress": None if c.progress is None else vars(c.progress)} for c in self.claims],
                "results": [] if self.engine is None else [vars(r) for r in self.engine.results]}


def daemon_status(inbox: Path, work: Path, outbox: Path, failed: Path, *, stable_seconds: float, last: int = 10,
                  now: float | None = None) -> DaemonStatus:
    """The shared folders' state at `now` (default: the share's time now, read off a probe file
    in the work area; this host's clock when the share cannot be written)."""
    status = DaemonStatus(inbox=Path(inbox), work=Path(work))
    if now is None:
        try:
            now = ShareClock(status.work, f"status-{os.uname().nodename}").now()
        except OSError:
            now, status.clock = time.time(), "host"
    if status.inbox.is_dir():
        for name in sorted(list_inbox(status.inbox)):
            try:
                signature = folder_signature(status.inbox / name)
            except PermissionError as exc:  # what the daemon (same user) cannot read either: it skips the folder
                status.ignored.append((name, f"unreadable: {describe_unreadable(status.inbox / name, exc)}; skipped until that changes"))
                continue
            if signature is None:
                continue
            waiting = _waiting(name, signature, stable_seconds, now)
            unreadable = unreadable_files(status.inbox / name) if waiting.ready else []
            if unreadable:
                status.ignored.append((name, "input_unreadable: " + "; ".join(why for _, why in unreadable[:5])
                                       + "; left in the inbox untouched until it can be read"))
                continue
            status.waiting.append(waiting)
        status.ignored += [(name, "temporary name (.part/.tmp/~): taken for a copy in progress, never for a job; rename it to start it")
                          for name in list_temporary(status.inbox)]
    refused = status.work / REFUSED_DIR
    if refused.is_dir():
        for marker in sorted(refused.glob("*.json")):
            try:
                data = json.loads(marker.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            status.ignored.append((data.get("folder", "?"), f"{data.get('reason')}: refused once, its content is in {data.get('failed')}"))
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
        if quiet >= stable_seconds:  # not a copy in progress any more: someone forgot the job file
            return Waiting(name, False, f"waiting for {JOB_FILE}: unchanged for {quiet:.0f} s without one; it starts once {JOB_FILE} is there")
        return Waiting(name, False, f"no {JOB_FILE} yet")
    if quiet >= stable_seconds:
        return Waiting(name, True, f"unchanged for {quiet:.0f} s")
    return Waiting(name, False, f"changed {max(quiet, 0):.0f} s ago; ready after {stable_seconds:g} s unchanged")


def _held(job: ClaimedJob, progress: Running | None, now: float) -> HeldClaim:
    claim, worker = job.claim, worker_record(job)
    if claim is None:
        return HeldClaim(folder="?", job_id=job.job_id, daemon_id=None, host=None, pid=None, lease="unknown",
                         lease_seconds_left=None, crashes=0, progress=progress)
    left = job.seconds_left(now)
    return HeldClaim(folder=claim.folder, job_id=claim.job_id, daemon_id=claim.daemon_id, host=claim.host, pid=claim.pid, lease=job.lease(now),
                     lease_seconds_left=None if left is None else round(left, 1), crashes=claim.crashes, progress=progress,
                     held=claim.held, holds=claim.holds, generation=job.generation, node=str((worker or {}).get("node", "")),
                     worker_pid=(worker or {}).get("pid"))


def format_daemon_status(status: DaemonStatus) -> str:
    """The status as lines for a terminal."""
    ready = [w for w in status.waiting if w.ready]
    lacking = [w for w in status.waiting if w.why.startswith(f"waiting for {JOB_FILE}")]
    out = [f"inbox {status.inbox}: {len(status.waiting)} folder(s), {len(ready)} ready, {len(status.waiting) - len(ready) - len(lacking)} still copying"
           + (f", {len(lacking)} waiting for {JOB_FILE}" if lacking else "")]
    out += [f"  {'ready  ' if w.ready else 'waiting' if w in lacking else 'copying'}  {w.folder}  ({w.why})" for w in status.waiting[:20]]
    if len(status.waiting) > 20:
        out.append(f"  ... {len(status.waiting) - 20} more")
    out += [f"  ignored  {folder}  ({why})" for folder, why in status.ignored[:20]]
    out.append("")
    out.append(f"claimed in {status.work}: {len(status.claims) or 'none'}" + (" (leases judged on this host's clock: the share could not be written)" if status.clock == "host" else ""))
    for claim in status.claims:
        if claim.daemon_id is None:
            out.append(f"  {claim.job_id}  no readable claim file (being claimed or removed)")
            continue
        if claim.lease == "live":
            lease = f"lease live, {claim.lease_seconds_left:.0f} s left"
        elif claim.lease == "expired":
            lease = f"LEASE EXPIRED {-(claim.lease_seconds_left or 0):.0f} s ago: the next daemon to scan takes it over and resumes it"
        elif claim.lease == "held":
            lease = f"held: {claim.held}; retried in {claim.lease_seconds_left:.0f} s (hold {claim.holds})"
        elif claim.lease == "retry":
            lease = f"held: {claim.held}; retry due: the next daemon to scan takes it up (hold {claim.holds})"
        else:
            lease = "released by a clean stop: the next daemon to scan resumes it"
        crashes = f", {claim.crashes} crashed run(s)" if claim.crashes else ""
        out.append(f"  {claim.folder}  {claim.job_id}  held by {claim.daemon_id} (host {claim.host}, pid {claim.pid}); {lease}{crashes}")
        if claim.node:
            out.append(f"      runs on node {claim.node} (worker pid {claim.worker_pid}, claim generation {claim.generation})")
        if claim.progress is not None:
            job = claim.progress
            out.append(f"      stage {stage_position(job)}, {job.state}" + (f": {job.detail}" if job.detail else ""))
        else:
            out.append("      not started by the engine yet")
    out.append("")
    out += format_results(status.engine.results if status.engine is not None else [])
    return "\n".join(out) + "\n"
