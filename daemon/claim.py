"""Claims: exactly one daemon runs a job, and a dead daemon's job is taken over by another.

On disk, in the work area (on the inbox's file system, so that a rename is atomic):

    <work>/<label>.<job-id>/        one claimed job, a "container"
        <name>/                     the job folder exactly as it was dropped as inbox/<name>/
        claim.000000.json           its owner: daemon id, host, pid, job id, lease expiry
        claim.000001.json           written by the daemon that took it over, and so on

The job folder keeps its name (the subject defaults to it), and nothing is added inside it.

Claiming a folder of the inbox:
  1. mkdir the container (its name holds a new job id, so it is unique);
  2. create claim.000000.json;
  3. rename inbox/<name> -> <container>/<name>. Of several daemons racing for one folder
     exactly one rename succeeds; the others find the source gone and remove their empty
     container. The claim exists before the job folder enters the work area, so a job in
     the work area always has an owner.

The owner is the claim file with the highest generation. The owner renews its lease (it
rewrites its own file) every lease/3 seconds from a heartbeat thread. A claim whose lease has
expired (its daemon died or froze) or that its owner released (a clean shutdown) is taken
over by creating the next generation's file. Claim files are created with link() of a
complete temporary file: link fails with EEXIST when the name exists, so of several daemons
taking over at once exactly one wins (this holds on NFS too, unlike most locks), and no
reader ever sees half a claim. A daemon that was only frozen finds a higher generation at
its next renewal and stops touching the job.

Leases compare wall-clock times written by different hosts: keep their clocks in sync
(NTP) to well within `lease_seconds`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from engine.fsutil import atomic_write_json, fsync_dir
from engine.job import safe_subject_name

CLAIM_PATTERN = re.compile(r"claim\.(\d{6,})\.json")
TRASH = ".trash"  # containers being removed: one rename out of sight, then rmtree

log = structlog.get_logger("daemon.claim")


@dataclass(frozen=True)
class Owner:
    """Who holds a claim. `daemon_id` must be unique among the daemons sharing an inbox."""

    daemon_id: str
    host: str
    pid: int

    @classmethod
    def this_process(cls, daemon_id: str) -> "Owner":
        return cls(daemon_id=daemon_id, host=socket.gethostname(), pid=os.getpid())


@dataclass(frozen=True)
class Claim:
    """The content of one claim file. Times are wall-clock epoch seconds."""

    job_id: str
    folder: str  # the job folder's name, as dropped in the inbox
    generation: int
    daemon_id: str
    host: str
    pid: int
    claimed_at: float
    lease_expires_at: float
    released: bool = False  # the owner stopped cleanly: anyone may take over at once
    crashes: int = 0  # runs of this job that ended without a clean stop (killed, lease lost, crashed)
    previous_owner: str = ""  # daemon id of the generation before, when taken over

    def expired(self, now: float) -> bool:
        return self.released or now >= self.lease_expires_at

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lease_expires"] = _iso(self.lease_expires_at)  # for people reading the file
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Claim":
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**fields)


@dataclass(frozen=True)
class ClaimedJob:
    """A container in the work area and its current claim (None when unreadable or missing)."""

    container: Path
    generation: int  # highest claim generation found; -1 when there is no claim file
    claim: Claim | None

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


def claim_path(container: Path, generation: int) -> Path:
    return container / f"claim.{generation:06d}.json"


def read_current(container: Path) -> ClaimedJob:
    """The container's highest-generation claim. Raises FileNotFoundError when the container is gone."""
    generations = [int(m.group(1)) for name in os.listdir(container) if (m := CLAIM_PATTERN.fullmatch(name))]
    if not generations:
        return ClaimedJob(container, -1, None)
    generation = max(generations)
    try:
        claim = Claim.from_json(json.loads(claim_path(container, generation).read_text("utf-8")))
    except FileNotFoundError:
        if not container.is_dir():
            raise
        claim = None  # removed between listing and reading: the container is being discarded
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("claim_unreadable", container=str(container), generation=generation, error=str(exc))
        claim = None
    return ClaimedJob(container, generation, claim)


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


def _create_exclusive(path: Path, value: dict[str, Any]) -> bool:
    """Create `path` holding `value` unless it exists. True when this call created it."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write((json.dumps(value, sort_keys=True, indent=2) + "\n").encode("utf-8"))
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
    now = time.time()
    claim = Claim(job_id=job_id, folder=source.name, generation=0, daemon_id=owner.daemon_id, host=owner.host, pid=owner.pid,
                  claimed_at=now, lease_expires_at=now + lease_seconds)
    try:
        if not _create_exclusive(claim_path(container, 0), claim.to_json()):
            raise FileExistsError(claim_path(container, 0))
        os.rename(source, container / source.name)
    except FileNotFoundError:
        shutil.rmtree(container, ignore_errors=True)
        return None
    except BaseException:
        shutil.rmtree(container, ignore_errors=True)
        raise
    fsync_dir(source.parent)
    fsync_dir(container)
    return ClaimedJob(container, 0, claim)


def take_over(seen: ClaimedJob, owner: Owner, lease_seconds: float, *, own_restart: bool = False) -> ClaimedJob | None:
    """Become the owner of the container that `seen` describes, if it is still as seen.

    Allowed when its claim has expired or was released, or (own_restart) when the claim is
    this daemon's own from before a restart. Returns the new claim, or None when the claim
    changed since it was seen, is alive, or another daemon won the race.
    """
    try:
        current = read_current(seen.container)
    except FileNotFoundError:
        return None
    if current.generation != seen.generation or current.claim is None or current.claim.folder != (seen.claim.folder if seen.claim else None):
        return None
    old = current.claim
    now = time.time()
    mine = own_restart and old.daemon_id == owner.daemon_id
    if not mine and not old.expired(now):
        return None
    claim = Claim(job_id=old.job_id, folder=old.folder, generation=current.generation + 1, daemon_id=owner.daemon_id,
                  host=owner.host, pid=owner.pid, claimed_at=now, lease_expires_at=now + lease_seconds,
                  crashes=old.crashes + (0 if old.released else 1), previous_owner=old.daemon_id)
    try:
        created = _create_exclusive(claim_path(seen.container, claim.generation), claim.to_json())
    except FileNotFoundError:
        return None  # the container was discarded meanwhile
    return ClaimedJob(seen.container, claim.generation, claim) if created else None


def still_owned(job: ClaimedJob) -> bool:
    """No later generation exists and the container is still there."""
    try:
        return read_current(job.container).generation == job.generation
    except FileNotFoundError:
        return False


def renew(job: ClaimedJob, lease_seconds: float) -> ClaimedJob | None:
    """Extend the lease of a claim this daemon holds; None when it was lost (taken over, or gone)."""
    assert job.claim is not None
    if not still_owned(job):
        return None
    claim = replace(job.claim, lease_expires_at=time.time() + lease_seconds)
    atomic_write_json(claim_path(job.container, job.generation), claim.to_json())
    return replace(job, claim=claim)


def release(job: ClaimedJob, *, crashed: bool = False) -> bool:
    """Give the claim up so that any daemon may take the job over at once (it resumes from
    its checkpoints). `crashed` counts this run as one that did not end cleanly."""
    assert job.claim is not None
    if not still_owned(job):
        return False
    claim = replace(job.claim, released=True, lease_expires_at=time.time(), crashes=job.claim.crashes + int(crashed))
    atomic_write_json(claim_path(job.container, job.generation), claim.to_json())
    return True


def discard(container: Path, work: Path) -> None:
    """Remove a container: one rename out of sight (other daemons never see half of it), then rmtree."""
    trash = Path(work) / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / container.name
    if target.exists():
        shutil.rmtree(target)
    os.rename(container, target)
    fsync_dir(Path(work))
    shutil.rmtree(target)


def empty_trash(work: Path) -> None:
    """Finish removals a crash interrupted."""
    trash = Path(work) / TRASH
    if trash.is_dir():
        for entry in trash.iterdir():
            shutil.rmtree(entry, ignore_errors=True)


class Heartbeat:
    """Renews the lease of the one claim this daemon holds, every lease/3 seconds, on its own
    thread, so that a long stage never lets the lease lapse. Calls `on_lost(job)` (from its
    thread) when another daemon took the claim over."""

    def __init__(self, lease_seconds: float, on_lost: Callable[[ClaimedJob], None]) -> None:
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self.on_lost = on_lost
        self._job: ClaimedJob | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def hold(self, job: ClaimedJob) -> None:
        with self._lock:
            self._job = job

    def drop(self) -> ClaimedJob | None:
        """Stop renewing; returns the claim as last renewed (None if it was lost)."""
        with self._lock:
            job, self._job = self._job, None
        return job

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                job = self._job
                if job is None:
                    continue
                try:
                    renewed = renew(job, self.lease_seconds)
                except OSError as exc:  # a network share hiccup: try again next beat
                    log.warning("claim_renew_failed", job_id=job.job_id, error=str(exc))
                    continue
                self._job = renewed
            if renewed is None:
                self.on_lost(job)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")
