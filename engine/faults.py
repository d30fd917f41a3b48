"""Fault injection for tests, driven by the environment so that it reaches a daemon subprocess.

Pause points: when ENGINE_PAUSE_AT names a point, the process reaching it creates the file
ENGINE_PAUSE_FILE and sleeps until it is killed (tests SIGKILL the engine at an exact moment
instead of racing it). With ENGINE_PAUSE_MODE=hold it goes on once the test removes that file
(tests change the world under a paused job, or freeze it there with SIGSTOP, then let it go).

Failed writes: ENGINE_FAIL_WRITES="<errno name>:<pattern>", e.g. "ENOSPC:*/prepared/*", makes
every atomic write (engine.fsutil) to a path matching the fnmatch pattern raise that OSError,
as a full disk would.

Unset (always, outside tests) each call costs one dictionary look-up.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    if os.environ.get("ENGINE_PAUSE_AT") != name:
        return
    marker = os.environ.get("ENGINE_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"{os.getpid()} {name}\n", encoding="utf-8")
    if os.environ.get("ENGINE_PAUSE_MODE") == "hold" and marker:
        while Path(marker).exists():
            time.sleep(0.05)
        return
    while True:
        time.sleep(3600)


def write_fault(path: Path) -> None:
    """Raise the OSError that ENGINE_FAIL_WRITES asks for when `path` matches its pattern."""
    wanted = os.environ.get("ENGINE_FAIL_WRITES")
    if not wanted:
        return
    name, _, pattern = wanted.partition(":")
    if fnmatch.fnmatch(str(path), pattern or "*"):
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code), str(path))
