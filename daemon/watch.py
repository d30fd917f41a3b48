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

What waits costs (almost) nothing. A folder is walked (every entry stat'ed) only when something
says it may have changed, never on every tick of the loop:
- a watch event named it, or the inbox listing (every `scan_seconds`) shows its own mtime
  changed (an entry was created, removed or renamed in it: `job.toml` arriving is one);
- the walk before saw a change (a copy in progress): it is walked again at the next tick;
- it holds `job.toml` and was quiet at its last walk: it is walked again when it may be ready,
  `stable_seconds` after the last change seen. It is ready only if that walk finds every entry
  exactly as the walk `stable_seconds` before did (a photo still growing in place, which moves
  no folder's mtime, is caught here), so the stability rule is as strict as walking it on every
  tick, and a slow copy is never started half done;
- it has no `job.toml` and is quiet: it is walked again on a back-off (its quiet time so far,
  at least `stable_seconds`, at most QUIET_WALK_MAX_SECONDS), for a share whose folder times
  are cached or late.
With 2,000 waiting folders the daemon idles at well under 2 % of a core (bench/bench_scan.py).

One folder never stalls the others. A folder this daemon may not read (a sub-folder of another
user with mode 0700; the daemon runs without read-override permission) is marked unreadable,
named once per change of reason, and skipped; a folder ready to run whose photo cannot be opened
(mode 0600 of another user) is refused as `input_unreadable` naming the file and its owner, left
in the inbox untouched (what cannot be read cannot be copied, so it must not be moved), and not
looked at again until it changes or that file becomes readable.

Hidden and temporary names (`engine.jobfolder.is_hidden_name`: `.x`, `~x`, `x.part`, `x.tmp`, ...)
are ignored as *job folders* in the inbox, and never count as the `job.toml` or `READY` that
make a folder ready. Inside a folder their changes still count as activity: a copy tool
writing `.photo.jpg.part` is a copy in progress, and starting before it is renamed to
`photo.jpg` would run the job without that photo.
"""

from __future__ import annotations

import errno
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

from engine.jobfolder import JOB_FILE, is_hidden_name, is_temporary_name, utf8_safe

READY_MARKER = "READY"
# A quiet folder without job.toml is walked again after its quiet time so far, at most this long
# (the listing's mtime check and watch events usually say sooner that it changed).
QUIET_WALK_MAX_SECONDS = 60.0
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


def describe_unreadable(folder: Path, exc: OSError) -> str:
    """'<path in the folder>: permission denied (owner uid N, mode 0700)' for an error met there."""
    path = Path(exc.filename) if exc.filename else folder
    relative = _relative(folder, exc)
    try:
        info = os.lstat(path)
        owner = f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"
    except OSError:
        owner = "owner unknown"
    return f"{utf8_safe(relative)}: {exc.strerror or exc} ({owner})"


def _relative(folder: Path, exc: OSError) -> str:
    """The path in `folder` that an error names ("." for the folder itself)."""
    try:
        return (Path(exc.filename) if exc.filename else folder).relative_to(folder).as_posix() or "."
    except ValueError:
        return "."


def unreadable_files(folder: Path, only: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(path in the folder, why) for each regular file under `folder` that this process cannot
    open for reading (or only those of `only`); links and special files are the engine's to
    refuse. Sub-folders it may not list are named too. Opening reads nothing."""
    folder = Path(folder)
    found: list[tuple[str, str]] = []

    def look(relative: str, path: Path) -> None:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                found.append((relative, describe_unreadable(folder, exc)))

    if only:
        for relative in only:
            look(relative, folder / relative)
        return found
    pending = [("", folder)]
    while pending and len(found) < MAX_ENTRIES:
        prefix, path = pending.pop()
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((prefix + entry.name + "/", Path(entry.path)))
                    elif entry.is_file(follow_symlinks=False):
                        look(prefix + entry.name, Path(entry.path))
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            found.append((prefix or ".", describe_unreadable(folder, exc)))
    return found


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
    due_at: float = 0.0  # monotonic seconds of its next walk (see the module's docstring)
    listed_mtime_ns: int = 0  # the folder's own mtime at the last inbox listing: a change means walk it now
    unreadable: str = ""  # why this daemon cannot use it ("" = it can): a folder it may not read, or input_unreadable
    unreadable_files: tuple[str, ...] = ()  # what could not be opened or listed: looked at again at every listing (a chmod moves no mtime)
    refused_signature: tuple[EntryKey, ...] | None = None  # input_unreadable: refused as it was then; a change is looked at again

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
        """List the inbox: start tracking new folders, forget vanished ones, and walk at the next
        refresh every folder whose own mtime changed since the last listing."""
        present = list_inbox(self.inbox)
        for name in list(self.folders):
            if name not in present:
                del self.folders[name]
        for name, mtime_ns in present.items():
            folder = self.folders.get(name)
            if folder is None:
                self._add(name, now, mtime_ns)
            elif mtime_ns != folder.listed_mtime_ns:
                folder.listed_mtime_ns = mtime_ns
                folder.due_at = min(folder.due_at, now)
            elif folder.unreadable_files and not unreadable_files(self.inbox / name, only=folder.unreadable_files):
                folder.due_at = min(folder.due_at, now)  # made readable (a chmod moves no mtime): look again now

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
        """Walk the folders not ready yet whose walk is due (the stability clock runs here)."""
        for folder in list(self.folders.values()):
            if not folder.ready and folder.due_at <= now:
                self._update(folder, now)

    def confirm(self, name: str, now: float) -> bool:
        """Right before claiming: is the folder still there, ready, unchanged since, and can
        every file of it be opened? A file that cannot is refused here (`input_unreadable`)."""
        folder = self.folders.get(name)
        if folder is None:
            return False
        self._update(folder, now)
        if name not in self.folders or not folder.ready:
            return False
        unreadable = unreadable_files(self.inbox / name)
        if unreadable:
            folder.ready, folder.ready_because = False, ""
            folder.refused_signature, folder.unreadable_files = folder.signature, tuple(path for path, _ in unreadable)
            folder.due_at = now + self._quiet_walk(folder, now)
            self._set_unreadable(folder, "input_unreadable: " + "; ".join(why for _, why in unreadable[:5]), refused=True)
        return folder.ready

    def forget(self, name: str) -> None:
        self.folders.pop(name, None)

    def ready_in_arrival_order(self) -> list[InboxFolder]:
        return sorted((f for f in self.folders.values() if f.ready), key=lambda f: f.arrival)

    def counts(self) -> tuple[int, int]:
        """(ready, still copying: neither ready nor unreadable)."""
        ready = sum(1 for f in self.folders.values() if f.ready)
        return ready, len(self.folders) - ready - len(self.unreadable())

    def unreadable(self) -> list[tuple[str, str]]:
        """(folder, why) for every folder this daemon cannot use: it may not read it, or a file of
        it (input_unreadable). Skipped until that changes; the others go on."""
        return sorted((f.name, f.unreadable) for f in self.folders.values() if f.unreadable)

    def _add(self, name: str, now: float, mtime_ns: int) -> None:
        folder = InboxFolder(name=name, seen_at=now, mtime_ns=mtime_ns, changed_at=now, listed_mtime_ns=mtime_ns)
        self.folders[name] = folder
        self._update(folder, now)
        log.debug("inbox_folder_seen", folder=name, ready=folder.ready)

    def _update(self, folder: InboxFolder, now: float) -> None:
        try:
            signature = folder_signature(self.inbox / folder.name)
        except PermissionError as exc:
            folder.ready, folder.ready_because, folder.signature = False, "", None
            folder.unreadable_files = (_relative(self.inbox / folder.name, exc),)
            folder.due_at = now + self._quiet_walk(folder, now)
            self._set_unreadable(folder, describe_unreadable(self.inbox / folder.name, exc))
            return
        if signature is None:
            del self.folders[folder.name]
            return
        changed = signature != folder.signature
        if changed:
            if folder.signature is not None and folder.ready:
                log.info("inbox_folder_changed_after_ready", folder=folder.name)
            folder.signature = signature
            folder.changed_at = now
        if folder.refused_signature is not None:
            if signature == folder.refused_signature and unreadable_files(self.inbox / folder.name, only=folder.unreadable_files):
                folder.ready, folder.ready_because = False, ""  # refused as it is: skipped until it changes
                folder.due_at = now + self._quiet_walk(folder, now)
                return
            folder.refused_signature = None  # changed, or made readable: a job again
        folder.unreadable_files = ()
        self._set_unreadable(folder, "")
        names = {path for path, _, _ in signature if "/" not in path}
        if READY_MARKER in names:
            folder.ready, folder.ready_because = True, "marker"
        elif JOB_FILE in names and now - folder.changed_at >= self.stable_seconds:
            folder.ready, folder.ready_because = True, "stable"
        else:
            folder.ready, folder.ready_because = False, ""
        if folder.ready:
            pass  # not walked again until it is claimed (confirm walks it once more)
        elif changed:
            folder.due_at = now  # a copy in progress: look again at the next tick
        elif JOB_FILE in names:
            folder.due_at = folder.changed_at + self.stable_seconds  # when it may be ready
        elif now - folder.changed_at < self.stable_seconds:
            folder.due_at = folder.changed_at + self.stable_seconds  # when a forgotten job.toml is worth a line
        else:
            folder.due_at = now + self._quiet_walk(folder, now)
        if JOB_FILE in names or folder.changed_at == now:
            folder.lacks_job_file_said = False
        elif now - folder.changed_at >= self.stable_seconds and not folder.lacks_job_file_said:
            # Photos and no job file, and nothing changing: not a copy in progress, a forgotten job.toml.
            folder.lacks_job_file_said = True
            log.warning("waiting_for_job_file", folder=folder.name, entries=len(signature),
                        note=f"unchanged for {self.stable_seconds:g} s without {JOB_FILE}; the job starts once {JOB_FILE} is there")

    def _quiet_walk(self, folder: InboxFolder, now: float) -> float:
        """Seconds to the next walk of a quiet folder: its quiet time so far, within
        [stable_seconds, QUIET_WALK_MAX_SECONDS]."""
        return min(QUIET_WALK_MAX_SECONDS, max(self.stable_seconds, now - folder.changed_at, 0.1))

    def _set_unreadable(self, folder: InboxFolder, why: str, *, refused: bool = False) -> None:
        """Record why the folder cannot be used ("" = it can), logging each change once."""
        if why == folder.unreadable:
            return
        if why and refused:
            log.error("job_refused", folder=utf8_safe(folder.name), code="input_unreadable", why=why, daemon_uid=os.geteuid(),
                      note="left in the inbox untouched: this daemon cannot copy what it cannot read, so it does not move it. Make "
                           f"the files readable to uid {os.geteuid()} (chmod/chown), or drop the folder again; it starts by itself then")
        elif why:
            log.error("inbox_folder_unreadable", folder=utf8_safe(folder.name), why=why, daemon_uid=os.geteuid(),
                      note="skipped (the other folders go on); it is looked at again when it changes")
        else:
            log.info("inbox_folder_readable", folder=utf8_safe(folder.name), was=folder.unreadable)
        folder.unreadable = why


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
        # The polling observer snapshots (stats) everything it watches on every poll: it watches
        # the inbox's own entries only (a folder's mtime moves when an entry is made, removed or
        # renamed in it); a file growing inside is caught by Readiness's walk at the end of the
        # stability window, so a deep snapshot would only cost a stat per file per poll.
        observer.schedule(self._handler, str(self.inbox), recursive=not isinstance(observer, PollingObserver))
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

