"""Claims: exactly one daemon runs a job, a dead daemon's job is taken over by another, and a
daemon that lost its claim writes nothing more.

On disk, in the work area (on the inbox's file system, so that a rename is atomic):

    <work>/<label>.<job-id>/        one claimed job, a "container"
        <name>/                     the job folder exactly as it was dropped as inbox/<name>/
        claim.000000.json           its owner: daemon id, host, pid (+ start time), job id, lease
        claim.000001.json           written by the daemon that took it over, and so on
        worker.000001.json          with the Ray backend: the node and process that run that
                                    generation's attempt (daemon status shows it)

The job folder keeps its name (the subject defaults to it), and nothing is added inside it.

Claiming a folder of the inbox:
  1. mkdir the container (its name holds a new job id, so it is unique);
  2. create claim.000000.json;
  3. rename inbox/<name> -> <container>/<name>. Of several daemons racing for one folder
     exactly one rename succeeds; the others find the source gone and remove their empty
     container. The claim exists before the job folder enters the work area, so a job in
     the work area always has an owner.

The owner is the claim file with the highest generation; the generation is the owner's fencing
token (it goes into every audit line the job writes). The owner renews its lease (rewrites its
own file) every lease/3 seconds from a heartbeat thread. Leases are judged on the share's clock
(daemon.clock): a claim is alive while its file's mtime, stamped by the file system at the last
renewal, is younger than the lease; never by comparing two hosts' wall clocks. A claim whose
lease has expired (its daemon died or froze), that its owner released (a clean stop), or that
its owner put on hold (the disk or share failed it; see `held`) and whose retry time has come,
is taken over by creating the next generation's file. Claim files are created with link() of a
complete temporary file: link fails with EEXIST when the name exists, so of several daemons
taking over at once exactly one wins (this holds on NFS too, unlike most locks), and no reader
ever sees half a claim.

The owner's own view of its lease (`ClaimFence`, which the engine asks before every write) runs
on the local boot clock from the start of its last renewal: a daemon frozen past its lease finds
the fence shut the moment it wakes, before it writes anything, whether or not another daemon has
taken over yet. A daemon's own claim from before a restart is taken back at once only when the
recorded process is dead (same host, pid and start time no longer running); otherwise it waits
for the lease like anyone else.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from daemon.clock import local_seconds
from engine import OwnershipLost
from engine.jobfolder import (atomic_write_json, classify_os_error, describe_os_error, fsync_dir, json_bytes, remove_tree, restamp,
                              safe_subject_name, shared_file_mode, unguarded_writes)

CLAIM_PATTERN = re.compile(r"claim\.(\d{6,})\.json")
TRASH = ".trash"  # containers being removed: one rename out of sight, then removed
REFUSED_DIR = ".refused"  # inbox folders refused without a claim (mount points): one marker each, so that it happens once

log = structlog.get_logger("daemon.claim")


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22): a pid that
    was reused by another process has another start time. None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[19])


def process_alive(pid: int, started: int | None) -> bool:
    """Is process `pid` (that started at `started`) still running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    now_started = process_start(pid)
    return started is None or now_started is None or now_started == started


@dataclass(frozen=True)
class Owner:
    """Who holds a claim. `daemon_id` must be unique among the daemons sharing an inbox."""

    daemon_id: str
    host: str
    pid: int
    pid_start: int | None = None

    @classmethod
    def this_process(cls, daemon_id: str) -> "Owner":
        return cls(daemon_id=daemon_id, host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()))

    def is_dead_here(self, host: str, pid: int, pid_start: int | None) -> bool:
        """Is the process (host, pid, pid_start) known for sure to be dead? Only a process of this
        host can be known dead; one of another host is judged by its lease."""
        return host == self.host and not process_alive(pid, pid_start) and (pid, pid_start) != (self.pid, self.pid_start)


@dataclass(frozen=True)
class Claim:
    """The content of one claim file. Wall-clock times are for people; leases are judged by the
    file's mtime on the share's clock."""

    job_id: str
    folder: str  # the job folder's name, as dropped in the inbox
    generation: int
    daemon_id: str
    host: str
    pid: int
    claimed_at: float
    lease_seconds: float
    pid_start: int | None = None
    released: bool = False  # the owner stopped cleanly, or put the job on hold: anyone may take over
    crashes: int = 0  # runs of this job that ended without a clean stop (killed, lease lost, crashed)
    previous_owner: str = ""  # daemon id of the generation before, when taken over
    held: str = ""  # why the job is on hold ("disk_full: No space left on device (/outbox/...)"); "" = not held
    holds: int = 0  # how many times in a row the job was held: its retry waits longer each time
    retry_seconds: float = 0.0  # a held job may be taken over this long after the hold

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["claimed"] = _iso(self.claimed_at)  # for people reading the file
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Claim":
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        fields.setdefault("lease_seconds", 60.0)
        return cls(**fields)


@dataclass(frozen=True)
class ClaimedJob:
    """A container in the work area and its current claim (None when unreadable or missing)."""

    container: Path
    generation: int  # highest claim generation found; -1 when there is no claim file
    claim: Claim | None
    renewed_at: float = 0.0  # the claim file's mtime: its last renewal, on the share's clock

    @property
    def job_id(self) -> str:
        return self.claim.job_id if self.claim else self.container.name.rsplit(".", 1)[-1]

    @property
    def folder(self) -> Path:
        """The job folder, exactly as dropped (only known from a readable claim)."""
        assert self.claim is not None
        return self.container / self.claim.folder

    def has_folder(self) -> bool:
        return self.claim is not None and (self.container / self.claim.folder).is_dir()

    def lease(self, share_now: float) -> str:
        """live | expired | released | held (waiting for its retry) | retry (held, and due)."""
        if self.claim is None:
            return "unknown"
        age = share_now - self.renewed_at
        if self.claim.held:
            return "retry" if age >= self.claim.retry_seconds else "held"
        if self.claim.released:
            return "released"
        return "expired" if age >= self.claim.lease_seconds else "live"

    def takeable(self, share_now: float) -> bool:
        return self.lease(share_now) in ("expired", "released", "retry")

    def seconds_left(self, share_now: float) -> float | None:
        """Until the lease expires (live) or the retry is due (held); negative: that long ago."""
        if self.claim is None:
            return None
        window = self.claim.retry_seconds if self.claim.held else self.claim.lease_seconds
        return self.renewed_at + window - share_now


def claim_path(container: Path, generation: int) -> Path:
    return container / f"claim.{generation:06d}.json"


def worker_path(container: Path, generation: int) -> Path:
    return container / f"worker.{generation:06d}.json"


def worker_record(job: ClaimedJob) -> dict[str, Any] | None:
    """Which cluster worker runs the attempt of the claim's current generation (None: none
    recorded, e.g. the local backend, or the attempt has not started)."""
    try:
        with open(worker_path(job.container, job.generation), "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def highest_generation(container: Path) -> int:
    """The container's highest claim generation (-1: none). FileNotFoundError when it is gone."""
    generations = [int(m.group(1)) for name in os.listdir(container) if (m := CLAIM_PATTERN.fullmatch(name))]
    return max(generations, default=-1)


def read_current(container: Path) -> ClaimedJob:
    """The container's highest-generation claim. Raises FileNotFoundError when the container is gone."""
    generation = highest_generation(container)
    if generation < 0:
        return ClaimedJob(container, -1, None)
    try:
        with open(claim_path(container, generation), "rb") as handle:  # content and mtime of one and the same file
            renewed_at = os.fstat(handle.fileno()).st_mtime
            claim = Claim.from_json(json.loads(handle.read().decode("utf-8")))
    except FileNotFoundError:
        if not container.is_dir():
            raise
        return ClaimedJob(container, generation, None)  # removed between listing and reading: being discarded
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("claim_unreadable", container=str(container), generation=generation, error=str(exc))
        return ClaimedJob(container, generation, None)
    return ClaimedJob(container, generation, claim, renewed_at)


def find_claims(work: Path) -> list[ClaimedJob]:
    """Every container of the work area with its current claim, oldest job first."""
    found = []
    with os.scandir(work) as listing:
        names = sorted(entry.name for entry in listing if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."))
    for name in names:
        try:
            found.append(read_current(work / name))
        except FileNotFoundError:
            continue
    return sorted(found, key=lambda job: (job.job_id, job.container.name))


def create_exclusive(path: Path, value: dict[str, Any]) -> bool:
    """Create `path` holding `value` unless it exists. True when this call created it."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(json_bytes(value))  # the bytes every renewal writes again in place
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp_name, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_name)
    fsync_dir(path.parent)
    return True


def claim_folder(source: Path, work: Path, job_id: str, owner: Owner, lease_seconds: float) -> ClaimedJob | None:
    """Move inbox folder `source` into a new container under `work`, owned by `owner`.

    Returns None when another daemon claimed it first (or it vanished). Other OS errors
    (e.g. EXDEV: the work area is on another file system) are raised, the inbox untouched.
    """
    source, work = Path(source), Path(work)
    container = work / f"{safe_subject_name(source.name)[:64]}.{job_id}"
    work.mkdir(parents=True, exist_ok=True)
    container.mkdir()
    claim = Claim(job_id=job_id, folder=source.name, generation=0, daemon_id=owner.daemon_id, host=owner.host, pid=owner.pid,
                  pid_start=owner.pid_start, claimed_at=_now(), lease_seconds=lease_seconds)
    try:
        if not create_exclusive(claim_path(container, 0), claim.to_json()):
            raise FileExistsError(claim_path(container, 0))
        os.rename(source, container / source.name)
    except FileNotFoundError:
        remove_tree(container)
        return None
    except BaseException:
        remove_tree(container)
        raise
    fsync_dir(source.parent)
    fsync_dir(container)
    return read_current(container)


def take_over(seen: ClaimedJob, owner: Owner, lease_seconds: float, share_now: float, *, own_restart: bool = False,
              own_attempt: bool = False) -> ClaimedJob | None:
    """Become the owner of the container that `seen` describes, if it is still as seen.

    Allowed when its claim has expired, was released, or was held and its retry is due (all on
    the share's clock `share_now`), or (own_restart) when it is this daemon's own claim from
    before a restart and the process that made it is dead, or (own_attempt, see next_attempt)
    when this very process holds it. Returns the new claim, or None when the claim changed since
    it was seen, is alive, or another daemon won the race.
    """
    try:
        current = read_current(seen.container)
    except FileNotFoundError:
        return None
    if current.generation != seen.generation or current.claim is None or current.claim.folder != (seen.claim.folder if seen.claim else None):
        return None
    old = current.claim
    mine = old.daemon_id == owner.daemon_id and (
        (own_restart and owner.is_dead_here(old.host, old.pid, old.pid_start))
        or (own_attempt and (old.host, old.pid, old.pid_start) == (owner.host, owner.pid, owner.pid_start)))
    if not mine and not current.takeable(share_now):
        return None
    claim = Claim(job_id=old.job_id, folder=old.folder, generation=current.generation + 1, daemon_id=owner.daemon_id, host=owner.host,
                  pid=owner.pid, pid_start=owner.pid_start, claimed_at=_now(), lease_seconds=lease_seconds,
                  crashes=old.crashes + (0 if old.released else 1), previous_owner=old.daemon_id, holds=old.holds)
    try:
        created = create_exclusive(claim_path(seen.container, claim.generation), claim.to_json())
    except FileNotFoundError:
        return None  # the container was discarded meanwhile
    return read_current(seen.container) if created else None


def still_owned(job: ClaimedJob) -> bool:
    """No later generation exists and the container is still there."""
    try:
        return highest_generation(job.container) == job.generation
    except FileNotFoundError:
        return False


def renew(job: ClaimedJob) -> ClaimedJob | None:
    """Extend the lease of a claim this daemon holds (write its file again: the share stamps the
    renewal); None when it was lost (taken over, or gone)."""
    assert job.claim is not None
    if not still_owned(job):
        return None
    rewrite_in_place(claim_path(job.container, job.generation), job.claim.to_json())
    return job


def rewrite_in_place(path: Path, value: dict[str, Any]) -> None:
    """A lease's renewal: the file's same bytes written over it in place, so that the share
    stamps its mtime without a temporary file or a new block (a renewal must work on a full
    disk: a lapsed lease would end the job as lost); atomically rewritten when its bytes differ
    (the first renewal after create_exclusive's formatting, or a file someone else changed)."""
    if not restamp(path, json_bytes(value)):
        atomic_write_json(path, value)


def release(job: ClaimedJob, *, crashed: bool = False, held: str = "", retry_seconds: float = 0.0) -> bool:
    """Give the claim up so that another daemon (or this one) may take the job over: at once,
    or, when `held` says why the job is on hold, after `retry_seconds`. It resumes from its
    checkpoints. `crashed` counts this run as one that did not end cleanly."""
    assert job.claim is not None
    if not still_owned(job):
        return False
    claim = replace(job.claim, released=True, crashes=job.claim.crashes + int(crashed), held=held,
                    holds=job.claim.holds + 1 if held else 0, retry_seconds=retry_seconds if held else 0.0)
    atomic_write_json(claim_path(job.container, job.generation), claim.to_json())
    return True


def discard(container: Path, work: Path) -> None:
    """Remove a container: one rename out of sight (other daemons never see half of it), then remove it."""
    trash = Path(work) / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / container.name
    remove_tree(target)
    os.rename(container, target)
    fsync_dir(Path(work))
    remove_tree(target)


def empty_trash(work: Path) -> None:
    """Finish removals a crash interrupted."""
    trash = Path(work) / TRASH
    if trash.is_dir():
        for entry in trash.iterdir():
            try:
                remove_tree(entry)
            except OSError as exc:
                log.warning("trash_not_removed", path=str(entry), error=str(exc))


class ClaimFence:
    """The engine's fence (engine.jobfolder.Fence) for the one claim this daemon holds.

    `check` refuses (OwnershipLost) once the claim is known lost, once its lease is past on the
    local boot clock (a renewal overdue: the process was frozen, or the share failed it), and
    with io=True also when a later generation exists. Past half its lease without a renewal (the
    heartbeat thread is late: a busy host), the fence renews on the spot, while the claim is still
    this daemon's and its file still fresh on the share's clock; so a heartbeat that was merely
    slow costs nothing, and one frozen with the whole process is caught on waking."""

    def __init__(self, job: ClaimedJob, lease_seconds: float, renew_now: Callable[[], bool]) -> None:
        self.token = job.generation
        self.container = job.container
        self.lease_seconds = lease_seconds
        self.margin = lease_seconds / 10  # clock rates drift; a renewal's own write takes time
        self._renew_now = renew_now
        started = local_seconds()
        self._valid_until = started + lease_seconds - self.margin
        self._renew_by = started + lease_seconds / 2
        self._lost = ""
        self._fault = ""  # the disk fault the last renewal failed on ("" once one succeeds)
        self.lapsed_on = ""  # the disk fault behind a lease that ran out, once it has: recorded, never a crash
        self._lock = threading.Lock()

    def renewed(self, started_at: float) -> None:
        """A renewal that started at local time `started_at` succeeded."""
        with self._lock:
            self._valid_until = max(self._valid_until, started_at + self.lease_seconds - self.margin)
            self._renew_by = max(self._renew_by, started_at + self.lease_seconds / 2)
            self._fault = ""

    @property
    def seconds_left(self) -> float:
        """Of the lease on the local clock (negative: ran out that long ago)."""
        return self._valid_until - local_seconds()

    def renew_failed(self, exc: OSError) -> str:
        """A renewal failed; returns its disk fault ("disk_full: ...") or "" when it is not one."""
        code = classify_os_error(exc)
        with self._lock:
            self._fault = f"{code}: {describe_os_error(exc)}" if code else ""
            return self._fault

    def lose(self, why: str) -> None:
        with self._lock:
            self._lost = self._lost or why

    @property
    def lost(self) -> str:
        return self._lost

    def check(self, what: str, *, io: bool = True) -> None:
        if self._lost:
            raise OwnershipLost(f"{what}: {self._lost}")
        if local_seconds() >= self._renew_by:
            self._renew_now()
        if local_seconds() >= self._valid_until:
            with self._lock:
                fault = self._fault
            if fault and not self._lost:
                self.lapsed_on = fault
                self.lose(f"the lease of claim generation {self.token} ran out: its renewals failed on a disk fault of the work area "
                          f"({fault}); recorded as such once the disk is back, not counted as a crash")
            self.lose(f"the lease of claim generation {self.token} ran out (renewal overdue by more than the lease: the process was "
                      "frozen, or the share refused the renewals)")
            raise OwnershipLost(f"{what}: {self._lost}")
        if io:
            try:
                current = highest_generation(self.container)
            except FileNotFoundError:
                current = -1
            if current != self.token:
                self.lose(f"claim generation {self.token} was taken over (generation {current} exists)" if current > self.token
                          else "the claimed job's container is gone")
                raise OwnershipLost(f"{what}: {self._lost}")


class Heartbeat:
    """Renews the leases of the claims this daemon holds (and the daemon's presence), every
    lease/3 seconds, on its own thread, so that a long stage never lets a lease lapse. Calls
    `on_lost(job)` (from its thread) when another daemon took a claim over. A daemon holds one
    claim per job it runs (one with the local backend; one per cluster worker with Ray)."""

    def __init__(self, lease_seconds: float, on_lost: Callable[[ClaimedJob], None], share_now: Callable[[], float],
                 also: Callable[[], None] | None = None, on_fault: Callable[[str], None] | None = None) -> None:
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self.on_lost = on_lost
        self.share_now = share_now
        self.also = also  # renews the daemon's presence on every beat
        self.on_fault = on_fault  # a renewal failed on a disk fault (called with it): the daemon probes its folders
        self._held: dict[Path, tuple[ClaimedJob, ClaimFence]] = {}  # by container
        self._lapsed: dict[Path, str] = {}  # containers whose lease ran out on a disk fault, once forgotten: that fault
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def hold(self, job: ClaimedJob) -> ClaimFence:
        """Start renewing `job` (in place of an earlier generation of its container, which this
        daemon gave up by taking the next one); returns the fence the engine asks before each write."""
        with self._lock:
            before = self._held.get(job.container)
            if before is not None:
                before[1].lose(f"claim generation {before[0].generation} was superseded by this daemon's generation {job.generation}")
            fence = ClaimFence(job, self.lease_seconds, lambda: self.renew_now(job.container))
            self._held[job.container] = (job, fence)
            return fence

    def lose(self, why: str) -> None:
        """Shut the fences of every claim held now (this process must not write for them any more)."""
        with self._lock:
            for _job, fence in self._held.values():
                fence.lose(why)

    def drop(self, container: Path) -> ClaimedJob | None:
        """Stop renewing the claim of `container`; returns it as last renewed (None if it was lost)."""
        with self._lock:
            job, fence = self._held.pop(container, (None, None))
        return None if job is None or (fence is not None and fence.lost) else job

    def current(self, container: Path) -> ClaimedJob | None:
        """The claim of `container` as last renewed, while it is held and not lost."""
        with self._lock:
            job, fence = self._held.get(container, (None, None))
        return None if job is None or (fence is not None and fence.lost) else job

    def lapsed_on(self, container: Path) -> str:
        """The disk fault that made the lease of `container`'s claim run out ("" if it did not)."""
        with self._lock:
            _job, fence = self._held.get(container, (None, None))
            return fence.lapsed_on if fence is not None else self._lapsed.pop(container, "")

    def _renew_failed(self, job: ClaimedJob, fence: ClaimFence, exc: OSError) -> None:
        fault = fence.renew_failed(exc)
        log.warning("claim_renew_failed", job_id=job.job_id, error=describe_os_error(exc), disk_fault=bool(fault),
                    lease_left_seconds=round(fence.seconds_left, 2))
        if fault and self.on_fault is not None:
            self.on_fault(fault)

    def renew_now(self, container: Path) -> bool:
        """Renew at once (the fence found the lease past on the local clock). False when the claim
        is lost or its file is too old on the share's clock for a renewal to be safe: another
        daemon may already have judged it expired."""
        with self._lock:
            job, fence = self._held.get(container, (None, None))
            if job is None or fence is None:
                return False
            try:
                started = local_seconds()
                current = read_current(job.container)
                if current.generation != job.generation or self.share_now() - current.renewed_at >= self.lease_seconds - fence.margin:
                    return False
                return self._renew(job, fence, started)
            except OSError as exc:
                self._renew_failed(job, fence, exc)
                return False

    def _renew(self, job: ClaimedJob, fence: ClaimFence, started: float) -> bool:
        # The fence renews from inside its own check, on the job's thread, under the job's write
        # guard (that check): the claim file's write must not ask it again (it recursed until a
        # RecursionError). renew_now has checked generation and age on the share just before.
        with unguarded_writes():
            renewed = renew(job)
        if renewed is None:
            fence.lose(f"claim generation {job.generation} was taken over by another daemon")
            self._forget(job)
            self.on_lost(job)
            return False
        fence.renewed(started)
        return True

    def _forget(self, job: ClaimedJob) -> None:
        if self._held.get(job.container, (None,))[0] is job:
            fence = self._held.pop(job.container)[1]
            if fence.lapsed_on:
                self._lapsed[job.container] = fence.lapsed_on

    def _run(self) -> None:
        said = ""  # the presence's last renewal error, as logged
        while not self._stop.wait(self.interval):
            if self.also is not None:
                try:
                    self.also()
                    said = ""
                except OSError as exc:  # the share's fault: said once per change, not with a traceback on every beat
                    if describe_os_error(exc) != said:
                        said = describe_os_error(exc)
                        log.warning("presence_renew_failed", error=said)
                except Exception:  # noqa: BLE001 - the presence must not stop the claim's renewals
                    log.exception("presence_renew_failed")
            with self._lock:
                for job, fence in list(self._held.values()):
                    if fence.lost:  # the fence found out first (at a write): report it once
                        self._forget(job)
                        if not fence.lapsed_on:  # a lease that ran out on a disk fault was not taken: the daemon records it
                            self.on_lost(job)
                        continue
                    try:
                        self._renew(job, fence, local_seconds())
                    except OSError as exc:  # a disk or share fault: try again next beat (the fence shuts if it lasts)
                        self._renew_failed(job, fence, exc)


class GenerationFence:
    """The fence of one attempt run by a cluster worker (daemon.cluster) for the daemon that
    holds the claim: the attempt owns the job while the container's highest claim generation is
    the one the daemon took for it. The daemon takes a new generation before every attempt (a
    retry after a lost node, a restart, another daemon's takeover), so an attempt that outlived
    its node, or was frozen while its retry took over, finds a later generation at its next write
    and writes nothing more. `io=False` (every denoising step) looks at the disk at most every
    `look_seconds`, so an orphan also stops computing soon."""

    def __init__(self, container: Path, token: int, look_seconds: float = 2.0) -> None:
        self.container = Path(container)
        self.token = token
        self.look_seconds = look_seconds
        self._looked = local_seconds()
        self._lost = ""

    @property
    def lost(self) -> str:
        return self._lost

    def check(self, what: str, *, io: bool = True) -> None:
        if not self._lost and (io or local_seconds() - self._looked >= self.look_seconds):
            self._looked = local_seconds()
            try:
                current = highest_generation(self.container)
            except FileNotFoundError:
                current = -1
            if current != self.token:
                self._lost = (f"claim generation {self.token} was superseded (generation {current} exists: the job was retried "
                              "elsewhere, or taken over)" if current > self.token else "the claimed job's container is gone")
        if self._lost:
            raise OwnershipLost(f"{what}: {self._lost}")


def next_attempt(job: ClaimedJob, owner: Owner, lease_seconds: float) -> ClaimedJob | None:
    """Take the next generation of a claim this process holds, for a new attempt at its job (the
    last one was lost with its node): the lost attempt's fence is shut by it, and it counts as a
    crash (the claim was not released). None when the claim is no longer this daemon's (taken
    over, or its container gone)."""
    return take_over(job, owner, lease_seconds, share_now=0.0, own_attempt=True)


def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")
