"""Time for leases: the share's clock for what daemons compare, this host's boot clock for itself.

Daemons on different hosts judge each other's leases. Their wall clocks may disagree by minutes
(no NTP in an air-gapped lab, a VM resumed from a snapshot), so a lease is never judged by
comparing wall-clock times written by two hosts. Instead:

- the *share's clock*: the file server stamps every file it writes with its own time (mtime).
  `ShareClock.now()` writes one byte to a probe file of this daemon's and reads the stamp back.
  A claim's lease is alive while the age of its claim file (rewritten at every renewal) on that
  clock is under the lease: every daemon reads both times off the same clock.
- this process's own view of its lease (the fence the engine asks before each write) runs on
  the local boot-time clock, which only measures durations and counts the time a process spent
  frozen (SIGSTOP) or the machine suspended: the lease is good for `lease - margin` seconds from
  the moment its last renewal *started*, which is never later than the share's stamp of it.

A host whose wall clock is off the share's by more than a tenth of the lease gets a `clock_skew`
warning: nothing depends on it, but job ids and the people reading timestamps do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_DIR = ".clock"


def local_seconds() -> float:
    """Seconds on this host's boot clock (CLOCK_BOOTTIME: monotonic, and counting suspend)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


class ShareClock:
    """The time of the file system holding `folder`, read off the mtime it gives a write."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = Path(folder) / CLOCK_DIR / name

    def now(self) -> float:
        """The share's time now (epoch seconds). A write, not utime(): utime(NULL) is set from
        this host's idea of the time by some clients and by libfaketime; a write is stamped by
        the file system itself."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"t", 0)
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)

    def skew(self) -> float:
        """This host's wall clock minus the share's, in seconds (positive: this host is ahead)."""
        before = time.time()
        share = self.now()
        return (before + time.time()) / 2 - share
