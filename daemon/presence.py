"""One live process per daemon id: a second daemon started with the id of a running one is refused.

A daemon's own claims are taken back at once after a restart (no waiting for their leases), so
two live processes with one `daemon_id` would each take the other's jobs for their own. Each
running daemon therefore keeps a presence file in the work area, renewed with its claims:

    <work>/.daemons/<daemon-id>/presence.000003.json   host, pid, pid start time, started at

created with the same exclusive link() as claims (of two daemons starting at once with one id,
exactly one wins). At start, an existing presence of that id blocks the new process while its
process is alive (same host: the pid and its start time say so for sure, frozen or not) or,
on another host, while the file is renewed (watched for up to one lease). A dead or stale
presence is replaced by the next generation; a daemon that finds a later generation than its own
(it was frozen so long that it was taken for dead) stops.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import structlog

from daemon.claim import Owner, create_exclusive, rewrite_in_place
from daemon.clock import ShareClock
from engine import ConfigError
from engine.jobfolder import atomic_write_json

PRESENCE_DIR = ".daemons"
PRESENCE_PATTERN = re.compile(r"presence\.(\d{6,})\.json")

log = structlog.get_logger("daemon.presence")


@dataclass(frozen=True)
class PresenceRecord:
    daemon_id: str
    host: str
    pid: int
    pid_start: int | None
    started_at: float
    released: bool = False  # stopped cleanly


@dataclass
class Presence:
    """This daemon's presence file; `renew()` on every heartbeat, `release()` at a clean stop."""

    path: Path
    generation: int
    record: PresenceRecord

    def renew(self) -> bool:
        """Rewrite the file (the share stamps the renewal). False when a later generation exists:
        another process took this id over (this one was frozen past its lease)."""
        if _highest(self.path.parent) != self.generation:
            return False
        rewrite_in_place(self.path, asdict(self.record))
        return True

    def release(self) -> None:
        if _highest(self.path.parent) == self.generation:
            atomic_write_json(self.path, asdict(replace(self.record, released=True)))


def register(work: Path, owner: Owner, lease_seconds: float, clock: ShareClock) -> Presence:
    """Claim `owner.daemon_id` for this process, or raise ConfigError naming the live holder."""
    folder = Path(work) / PRESENCE_DIR / owner.daemon_id
    folder.mkdir(parents=True, exist_ok=True)
    record = PresenceRecord(daemon_id=owner.daemon_id, host=owner.host, pid=owner.pid, pid_start=owner.pid_start, started_at=time.time())
    for _attempt in range(5):
        generation = _highest(folder)
        if generation >= 0:
            holder, renewed_at = _read(folder, generation)
            if holder is not None and not holder.released:
                _refuse_if_alive(owner, holder, renewed_at, folder / _name(generation), lease_seconds, clock)
        path = folder / _name(generation + 1)
        if create_exclusive(path, asdict(record)):
            for older in folder.iterdir():
                if (m := PRESENCE_PATTERN.fullmatch(older.name)) and int(m.group(1)) < generation:
                    older.unlink(missing_ok=True)
            return Presence(path=path, generation=generation + 1, record=record)
    raise ConfigError("duplicate_daemon_id", f"daemon id {owner.daemon_id!r}: another process keeps registering it at the same time ({folder})")


def _refuse_if_alive(owner: Owner, holder: PresenceRecord, renewed_at: float, path: Path, lease_seconds: float, clock: ShareClock) -> None:
    who = f"host {holder.host}, pid {holder.pid}"
    fix = ("give every daemon sharing this inbox its own [daemon] daemon_id (or --daemon-id), or stop the other process first; "
           f"its presence file is {path}")
    if holder.host == owner.host:
        if owner.is_dead_here(holder.host, holder.pid, holder.pid_start):
            log.info("daemon_id_taken_back", daemon_id=owner.daemon_id, previous_pid=holder.pid)
            return
        raise ConfigError("duplicate_daemon_id", f"daemon id {owner.daemon_id!r} is in use by a running process ({who}; alive, perhaps "
                                                 f"frozen): {fix}")
    deadline = time.monotonic() + lease_seconds * 1.5
    while clock.now() - renewed_at < lease_seconds:
        if time.monotonic() > deadline:
            break
        threading.Event().wait(min(1.0, lease_seconds / 10))  # not time.sleep: libfaketime (the skewed-clock test) breaks it
        _, now_renewed = _read(path.parent, int(PRESENCE_PATTERN.fullmatch(path.name).group(1)))
        if now_renewed != renewed_at:
            raise ConfigError("duplicate_daemon_id", f"daemon id {owner.daemon_id!r} is in use by a running daemon on {who} (its presence "
                                                     f"was renewed just now): {fix}")
    log.info("daemon_id_taken_over", daemon_id=owner.daemon_id, previous_host=holder.host, previous_pid=holder.pid)


def _name(generation: int) -> str:
    return f"presence.{generation:06d}.json"


def _highest(folder: Path) -> int:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return -1
    return max((int(m.group(1)) for name in names if (m := PRESENCE_PATTERN.fullmatch(name))), default=-1)


def _read(folder: Path, generation: int) -> tuple[PresenceRecord | None, float]:
    try:
        with open(folder / _name(generation), "rb") as handle:
            renewed_at = os.fstat(handle.fileno()).st_mtime
            data = json.loads(handle.read().decode("utf-8"))
        return PresenceRecord(**{k: data[k] for k in PresenceRecord.__dataclass_fields__ if k in data}), renewed_at
    except (OSError, ValueError, TypeError):
        return None, 0.0
