"""Noticing job folders in the inbox, and deciding when one has been copied completely.

File-system events are only hints. Over SMB/NFS they may never come, and even locally they
say that *something* changed, not that a copy is complete. So:

- `InboxWatcher` (watchdog: the native observer, or `PollingObserver` for a network share
  or where native watching is unavailable) only wakes the service and names the folder
  that changed;
- the service also lists the whole inbox every `scan_seconds`, so a missed event delays a
  job by at most one scan and never strands it;
- `Readiness` decides from its own `stat()` calls: a folder is ready when it holds
  `job.toml` and nothing in it changed (name, size, mtime in ns of every entry) for
  `stable_seconds` as measured by this daemon's clock, or at once when it holds a `READY`
  marker.

Hidden and temporary names (`engine.job.is_hidden_name`: `.x`, `~x`, `x.part`, `x.tmp`, ...)
are ignored as *job folders* in the inbox, and never count as the `job.toml` or `READY` that
make a folder ready. Inside a folder their changes still count as activity: a copy tool
writing `.photo.jpg.part` is a copy in progress, and starting before it is renamed to
`photo.jpg` would run the job without that photo.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from engine.jobfolder import JOB_FILE, is_hidden_name, is_temporary_name

READY_MARKER = "READY"
# A job folder holds 1-3 photos and a job.toml; a tree far larger than this is not a job, and
# stat()ing it on every tick would only load a network share.
MAX_ENTRIES = 2000

# (path relative to the job folder, size in bytes, mtime in ns) of one entry.
EntryKey = tuple[str, int, int]

log = structlog.get_logger("daemon.watch")

# watchdog 7's inotify emitter warns "Callback with id ... already exists for watch" each time a
# watched folder is moved within the tree it watches (every claim: inbox/<name> -> the work area
# inside the inbox). It only re-registers the same callback; the events still come, and the full
# scan every scan_seconds catches any that would not. Not a line a lab should read on every job.
warnings.filterwarnings("ignore", message="Callback with id .* already exists for watch", category=RuntimeWarning)


def folder_signature(folder: Path) -> tuple[EntryKey, ...] | None:
    """Every entry under `folder` (hidden ones included), sorted; None when the folder is gone.

    Symbolic links are not followed. A folder with more than MAX_ENTRIES entries gets a
    signature that still changes with its content (the first MAX_ENTRIES plus the count).
    """
    entries: list[EntryKey] = []
    pending = [("", Path(folder))]
    count = 0
    while pending:
        prefix, path = pending.pop()
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    count += 1
                    if count > MAX_ENTRIES:
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we looked: the next look differs anyway
                    is_dir = entry.is_dir(follow_symlinks=False)
                    entries.append((prefix + entry.name, 0 if is_dir else info.st_size, info.st_mtime_ns))
                    if is_dir:
                        pending.append((prefix + entry.name + "/", Path(entry.path)))
        except (FileNotFoundError, NotADirectoryError):
            if not prefix:
                return None
    if count > MAX_ENTRIES:
        entries.append(("<entries>", count, 0))
    return tuple(sorted(entries))


def list_temporary(inbox: Path) -> list[str]:
    """Folders of the inbox that are not taken for jobs because of their temporary names
    (`x.part`, `x.tmp`, `~x`, ...): a copy tool is still writing them, or they were left so."""
    with os.scandir(inbox) as listing:
        return sorted(entry.name for entry in listing if is_temporary_name(entry.name) and not entry.name.startswith(".")
                      and entry.is_dir(follow_symlinks=False))


def list_inbox(inbox: Path) -> dict[str, int]:
    """The job folders in the inbox (visible directories, no links) -> the folder's mtime in ns."""
    folders: dict[str, int] = {}
    with os.scandir(inbox) as listing:
        for entry in listing:
            if is_hidden_name(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                folders[entry.name] = entry.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
    return folders


@dataclass
class InboxFolder:
    """One folder of the inbox as this daemon has seen it."""

    name: str
    seen_at: float  # monotonic seconds when this daemon first saw it (arrival order)
    mtime_ns: int  # the folder's mtime then (orders the folders found by one scan)
    signature: tuple[EntryKey, ...] | None = None
    changed_at: float = 0.0  # monotonic seconds of the last change seen
    ready: bool = False
    ready_because: str = ""  # "marker" | "stable"
    lacks_job_file_said: bool = False  # the "waiting_for_job_file" line was logged for this quiet spell

    @property
    def arrival(self) -> tuple[float, int, str]:
        return (self.seen_at, self.mtime_ns, self.name)


class Readiness:
    """Tracks the inbox's folders from first sight until they are claimed or vanish.

    Every method takes `now` (monotonic seconds) so the rules can be tested without sleeping.
    """

    def __init__(self, inbox: Path, stable_seconds: float) -> None:
        self.inbox = Path(inbox)
        self.stable_seconds = stable_seconds
        self.folders: dict[str, InboxFolder] = {}

    def scan(self, now: float) -> None:
        """List the inbox: start tracking new folders, forget vanished ones."""
        present = list_inbox(self.inbox)
        for name in list(self.folders):
            if name not in present:
                del self.folders[name]
        for name, mtime_ns in present.items():
            if name not in self.folders:
                self._add(name, now, mtime_ns)

    def touch(self, name: str, now: float) -> None:
        """Something changed under inbox/<name> (a watch event): look at it now."""
        if is_hidden_name(name):
            return
        if name not in self.folders:
            try:
                info = os.lstat(self.inbox / name)
            except (FileNotFoundError, NotADirectoryError):
                return
            if stat.S_ISDIR(info.st_mode):
                self._add(name, now, info.st_mtime_ns)
        else:
            self._update(self.folders[name], now)

    def refresh(self, now: float) -> None:
        """Look again at every folder that is not ready yet (the stability clock runs here)."""
        for folder in list(self.folders.values()):
            if not folder.ready:
                self._update(folder, now)

    def confirm(self, name: str, now: float) -> bool:
        """Right before claiming: is the folder still there, ready, and unchanged since?"""
        folder = self.folders.get(name)
        if folder is None:
            return False
        self._update(folder, now)
        return name in self.folders and folder.ready

    def forget(self, name: str) -> None:
        self.folders.pop(name, None)

    def ready_in_arrival_order(self) -> list[InboxFolder]:
        return sorted((f for f in self.folders.values() if f.ready), key=lambda f: f.arrival)

    def counts(self) -> tuple[int, int]:
        """(ready, still copying)."""
        ready = sum(1 for f in self.folders.values() if f.ready)
        return ready, len(self.folders) - ready

    def _add(self, name: str, now: float, mtime_ns: int) -> None:
        folder = InboxFolder(name=name, seen_at=now, mtime_ns=mtime_ns, changed_at=now)
        self.folders[name] = folder
        self._update(folder, now)
        log.debug("inbox_folder_seen", folder=name, ready=folder.ready)

    def _update(self, folder: InboxFolder, now: float) -> None:
        signature = folder_signature(self.inbox / folder.name)
        if signature is None:
            del self.folders[folder.name]
            return
        if signature != folder.signature:
            if folder.signature is not None and folder.ready:
                log.info("inbox_folder_changed_after_ready", folder=folder.name)
            folder.signature = signature
            folder.changed_at = now
        names = {path for path, _, _ in signature if "/" not in path}
        if READY_MARKER in names:
            folder.ready, folder.ready_because = True, "marker"
        elif JOB_FILE in names and now - folder.changed_at >= self.stable_seconds:
            folder.ready, folder.ready_because = True, "stable"
        else:
            folder.ready, folder.ready_because = False, ""
        if JOB_FILE in names or folder.changed_at == now:
            folder.lacks_job_file_said = False
        elif now - folder.changed_at >= self.stable_seconds and not folder.lacks_job_file_said:
            # Photos and no job file, and nothing changing: not a copy in progress, a forgotten job.toml.
            folder.lacks_job_file_said = True
            log.warning("waiting_for_job_file", folder=folder.name, entries=len(signature),
                        note=f"unchanged for {self.stable_seconds:g} s without {JOB_FILE}; the job starts once {JOB_FILE} is there")


def observer_class(polling: bool) -> type:
    """watchdog's native observer for this platform (inotify on Linux), or the polling one."""
    return PollingObserver if polling else Observer


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path, on_change: Callable[[str], None]) -> None:
        self.inbox = os.fsdecode(os.path.abspath(inbox))
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads are not changes
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            name = _top_name(self.inbox, os.fsdecode(raw)) if raw else None
            if name:
                self.on_change(name)


def _top_name(inbox: str, path: str) -> str | None:
    """inbox/<name>/... -> <name>; None for the inbox itself or a path outside it."""
    relative = os.path.relpath(path, inbox)
    if relative == "." or relative.startswith(".." + os.sep) or relative == "..":
        return None
    return relative.split(os.sep, 1)[0]


class InboxWatcher:
    """Calls `on_change(folder name)` from watchdog's thread when something under the inbox changes.

    polling      use watchdog's PollingObserver (a network share: inotify sees only local writes)
    poll_seconds how often the polling observer compares its snapshots of the inbox
    If the native observer cannot start (e.g. the inotify watch limit is reached) the
    watcher falls back to polling and says so; `kind` tells which one runs.
    """

    def __init__(self, inbox: Path, on_change: Callable[[str], None], *, polling: bool, poll_seconds: float = 2.0) -> None:
        self.inbox = Path(inbox)
        self.polling = polling
        self.poll_seconds = poll_seconds
        self._handler = _Handler(self.inbox, on_change)
        self._observer: Any = None
        self.kind = ""

    def start(self) -> None:
        if not self.polling:
            try:
                self._observer = self._start(observer_class(False)())
                self.kind = "native"
                return
            except OSError as exc:
                log.warning("native_watch_unavailable", error=str(exc), fallback="polling")
        self._observer = self._start(observer_class(True)(timeout=self.poll_seconds))
        self.kind = "polling"

    @property
    def observer_name(self) -> str:
        return type(self._observer).__name__ if self._observer is not None else ""

    def _start(self, observer: Any) -> Any:
        observer.schedule(self._handler, str(self.inbox), recursive=True)
        observer.start()
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None


class Waker:
    """Folder names reported by the watcher's thread, collected for the service's loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self.event = threading.Event()

    def __call__(self, name: str) -> None:
        with self._lock:
            self._names.add(name)
        self.event.set()

    def take(self) -> set[str]:
        with self._lock:
            names, self._names = self._names, set()
        return names

    def wait(self, seconds: float) -> None:
        self.event.wait(seconds)
        self.event.clear()

