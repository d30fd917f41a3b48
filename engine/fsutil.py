"""Small file-system helpers shared by every layer: hashing, atomic writes, whole trees.

Every file another process may read is written to a temporary name in the same
folder, fsynced, and renamed over the target (maildir's tmp -> new), so a reader
or a crash never sees half a file.

Every write made here first asks the *write guard* of the calling context, when one is set
(`guarded_writes`): the runner sets one for the job in flight, so that a process that lost
its claim on the job (another daemon took it over) writes nothing more, whatever stage it is
in. Trees (a dropped job folder, which may be nested arbitrarily deep) are walked, copied,
hashed and removed with an explicit stack, never by recursion: Python's recursive os.walk,
shutil.copytree and shutil.rmtree overflow its stack on a deep tree.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.faults import write_fault

_CHUNK = 1 << 20
# The temporary name atomic_write_bytes gives a file (mkstemp: ".<name>.<8 random characters>.tmp").
_PARTIAL_WRITE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


# ---------------------------------------------------------------------------- file modes
# Files and folders a job writes, and the copies of dropped folders, take the process umask's
# modes (0644 files and 0755 folders under the usual 022): reviewers on the share read the
# evidence, not only the user the daemon runs as. A lab that wants 027 sets [daemon] umask
# (or the umask of the process that runs `engine run`). Private keys are created 0600 whatever
# the umask (engine.provenance.trust).

def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_umask = _read_umask()  # read once at import, while nothing else of this process creates files


def set_umask(mask: int) -> None:
    """Set the process umask (the daemon's [daemon] umask) and the modes derived from it."""
    global _umask
    os.umask(mask)
    _umask = mask


def shared_file_mode(executable: bool = False) -> int:
    """A new file's mode under the process umask (owner read/write always)."""
    return ((0o777 if executable else 0o666) & ~_umask) | 0o600


def shared_dir_mode() -> int:
    """A new folder's mode under the process umask (owner rwx always)."""
    return (0o777 & ~_umask) | 0o700


def share_modes(root: Path) -> None:
    """Give every file and folder under `root` (and `root`) the umask's modes, whatever wrote
    them (mkstemp and mkdtemp make 0600 / 0700, so do some libraries' writers). An executable
    file stays executable; links are left alone."""
    for entry in walk_tree(Path(root)):
        if entry.kind == "file":
            os.chmod(entry.path, shared_file_mode(bool(entry.info.st_mode & stat.S_IXUSR)))
        elif entry.kind == "dir":
            os.chmod(entry.path, shared_dir_mode())
    os.chmod(root, shared_dir_mode())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """The one JSON form we hash: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def utf8_safe(text: str) -> str:
    """`text` as it is, unless it holds what no UTF-8 file can: a file name that was not UTF-8
    (Python keeps its bytes as surrogate escapes) then shows those bytes as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the write guard

_write_guard: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("write_guard", default=None)


@contextlib.contextmanager
def guarded_writes(check: Callable[[str], None]) -> Iterator[None]:
    """Within the block (in this thread's context), every write made through this module
    first calls `check(what)`, which raises to refuse it (engine.errors.OwnershipLost)."""
    token = _write_guard.set(check)
    try:
        yield
    finally:
        _write_guard.reset(token)


@contextlib.contextmanager
def unguarded_writes() -> Iterator[None]:
    """Within the block, writes ask no guard: for the guard's own bookkeeping (a claim's renewal,
    made from inside its check), which would otherwise ask the guard again, and again."""
    token = _write_guard.set(None)
    try:
        yield
    finally:
        _write_guard.reset(token)


def check_write(what: str) -> None:
    """Ask the write guard of this context (if any) whether `what` may be written now."""
    check = _write_guard.get()
    if check is not None:
        check(what)


# ---------------------------------------------------------------------------- atomic files

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, shared_file_mode())  # mkstemp makes 0600: evidence is read by reviewers on the share, not only by this user
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fault(path)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        check_write(str(path))  # just before the file becomes visible under its name
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; say which (disk_full messages)
        raise
    fsync_dir(path.parent)


def remove_partial_writes(root: Path) -> list[str]:
    """Delete the temporary files of atomic writes that a killed process left under `root`;
    returns their POSIX paths relative to `root`, sorted.

    SIGKILL (or a power cut) between mkstemp and the rename skips atomic_write_bytes's
    clean-up; the target itself keeps its old content or stays absent. Only for a folder
    that no live process is writing to (a job folder being resumed by its one engine)."""
    root = Path(root)
    removed = []
    for entry in walk_tree(root):
        if entry.kind == "file" and _PARTIAL_WRITE.fullmatch(entry.name):
            os.unlink(entry.path)
            removed.append(entry.rel)
    return sorted(removed)


def append_whole(path: Path, data: bytes, check_start: Callable[[int], None] | None = None) -> int:
    """Append `data` (one or more whole lines) to `path` with O_APPEND and fsync, whole or not at
    all: on a full disk write() first writes part of it and only the next call fails, so what
    was written is cut off again before the error goes up. `check_start(size)` may refuse the
    write (by raising) after the file is open, seeing its size then. Returns that size."""
    check_write(str(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        if check_start is not None:
            check_start(start)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)  # never half a line
            raise
        return start
    finally:
        os.close(fd)


def restamp(path: Path, data: bytes) -> bool:
    """Write `data` over `path` in place when the file holds exactly that many bytes (a lease's
    renewal: the same bytes again), so that the file system stamps its mtime without a new file
    or a new block: it works on a full disk, where an atomic rewrite's temporary file cannot be
    made. False (nothing written) when the file's size differs: rewrite it atomically then.
    Readers never see anything but these bytes, as long as the file held them already."""
    check_write(str(path))
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if os.fstat(fd).st_size != len(data):
            return False
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def json_bytes(value: Any) -> bytes:
    """The bytes atomic_write_json writes for `value` (pretty, sorted: stable for equal values)."""
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """Pretty, sorted JSON (stable bytes for equal values), written atomically."""
    atomic_write_bytes(path, json_bytes(value))


def hash_tree(root: Path, relative_to: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (a file or a folder), keyed by POSIX path
    relative to `relative_to`. Temporary files of atomic writes are skipped."""
    root = Path(root)
    if root.is_file():
        return {root.relative_to(relative_to).as_posix(): sha256_file(root)}
    if not root.is_dir():
        return {}
    prefix = root.relative_to(relative_to).as_posix() + "/"
    prefix = "" if prefix == "./" else prefix
    return {prefix + entry.rel: sha256_file(Path(entry.path)) for entry in walk_tree(root)
            if entry.kind == "file" and not entry.name.endswith(".tmp")}


# ---------------------------------------------------------------------------- whole trees

class TreeLimit(Exception):
    """A tree is deeper, or holds more entries, than the walk allows."""

    def __init__(self, limit: str, where: str, allowed: int) -> None:
        super().__init__(f"{where}: more than {allowed} {limit}")
        self.limit = limit  # "levels" | "entries"
        self.where = where
        self.allowed = allowed


@dataclass(frozen=True)
class TreeEntry:
    rel: str  # POSIX path relative to the walked root, as UTF-8-safe text (utf8_safe)
    path: str  # the full path, as the OS spells it
    kind: str  # "dir" | "file" | "link" | "special" (a pipe, socket or device: no content to keep)
    depth: int  # 1 for the root's own entries
    info: os.stat_result  # lstat: links are never followed

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "special"


def walk_tree(root: Path, *, max_depth: int | None = None, max_entries: int | None = None) -> Iterator[TreeEntry]:
    """Every entry under the folder `root`, a folder before its content, names sorted; links
    are reported, never followed. An explicit stack instead of recursion: any depth works.
    Raises TreeLimit past `max_depth` levels or `max_entries` entries."""
    root_path = os.fspath(root)
    stack: list[tuple[str, str, int]] = [(root_path, "", 0)]
    count = 0
    while stack:
        folder, prefix, depth = stack.pop()
        with os.scandir(folder) as listing:
            children = sorted(listing, key=lambda item: item.name)
        if children and max_depth is not None and depth + 1 > max_depth:
            raise TreeLimit("levels", utf8_safe(prefix.rstrip("/")) or ".", max_depth)
        below = []
        for child in children:
            count += 1
            if max_entries is not None and count > max_entries:
                raise TreeLimit("entries", ".", max_entries)
            info = child.stat(follow_symlinks=False)
            rel = prefix + child.name
            entry = TreeEntry(rel=utf8_safe(rel), path=child.path, kind=_kind(info.st_mode), depth=depth + 1, info=info)
            yield entry
            if entry.kind == "dir":
                below.append((child.path, rel + "/", depth + 1))
        stack.extend(reversed(below))


@dataclass
class Listing:
    """What a tree holds: rel path -> sha256 (a file), "link:<target>" or "dir"; `left_out`
    names the special files (pipes, sockets, devices), which have no content to compare or copy."""

    entries: dict[str, str] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)

    def differences(self, other: "Listing") -> dict[str, list[str]]:
        """{added, changed, removed}: what `other` holds that this listing does not, and so on."""
        added = sorted(set(other.entries) - set(self.entries))
        removed = sorted(set(self.entries) - set(other.entries))
        changed = sorted(k for k in set(self.entries) & set(other.entries) if self.entries[k] != other.entries[k])
        return {"added": added, "changed": changed, "removed": removed}


def tree_listing(root: Path, *, max_depth: int | None = None, max_entries: int | None = None) -> Listing:
    """The Listing of the folder `root` (every file hashed)."""
    listing = Listing()
    for entry in walk_tree(root, max_depth=max_depth, max_entries=max_entries):
        if entry.kind == "file":
            listing.entries[entry.rel] = sha256_file(Path(entry.path))
        elif entry.kind == "link":
            listing.entries[entry.rel] = "link:" + utf8_safe(os.readlink(entry.path))
        elif entry.kind == "dir":
            listing.entries[entry.rel] = "dir"
        else:
            listing.left_out.append(entry.rel)
    return listing


def copy_tree(source: Path, target: Path, *, max_depth: int | None = None, max_entries: int | None = None,
              only: frozenset[str] | None = None) -> Listing:
    """Copy the folder `source` to `target` (which must not exist) as it is: every file byte
    for byte with its times (modes: the umask's, keeping a file's executable bit), folders, links as links (never followed: one may point
    anywhere, e.g. /etc/passwd). Special files have no content to keep, and opening one may
    block forever: they are left out. With `only` (Listing paths), just those entries and the
    folders above them. Returns the Listing of what was copied, hashed from the bytes as they
    were read (compare it with tree_listing(target) to verify the copy)."""
    listing = Listing()
    target_path = os.fspath(target)
    source_path = os.fspath(source)
    os.mkdir(target_path)
    folders = [(source_path, target_path)]
    above = set() if only is None else {"/".join(rel.split("/")[:n]) for rel in only for n in range(1, rel.count("/") + 1)}
    for entry in walk_tree(source, max_depth=max_depth, max_entries=max_entries):
        if only is not None and entry.rel not in only and not (entry.kind == "dir" and entry.rel in above):
            continue
        destination = os.path.join(target_path, os.path.relpath(entry.path, source_path))
        if entry.kind == "dir":
            os.mkdir(destination)
            folders.append((entry.path, destination))
            listing.entries[entry.rel] = "dir"
        elif entry.kind == "link":
            link_target = os.readlink(entry.path)
            os.symlink(link_target, destination)
            os.utime(destination, ns=(entry.info.st_atime_ns, entry.info.st_mtime_ns), follow_symlinks=False)
            listing.entries[entry.rel] = "link:" + utf8_safe(link_target)
        elif entry.kind == "file":
            listing.entries[entry.rel] = _copy_file(entry.path, destination, entry.info)
        else:
            listing.left_out.append(entry.rel)
    for folder, destination in reversed(folders):  # deepest first: filling a folder changes its mtime
        info = os.lstat(folder)
        os.chmod(destination, shared_dir_mode())
        os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))
    return listing


def _copy_file(source: str, destination: str, info: os.stat_result) -> str:
    """Copy one regular file; returns the sha256 of the bytes copied. O_NOFOLLOW and
    O_NONBLOCK: a file swapped for a link or a pipe after it was listed is refused, not followed
    or waited on."""
    digest = hashlib.sha256()
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file any more", source)
        out = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, shared_file_mode(bool(info.st_mode & stat.S_IXUSR)))  # the umask's, not the dropper's: reviewers read it
        finally:
            os.close(out)
    finally:
        os.close(fd)
    os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """Make every file and folder under `root` (and `root` itself) durable."""
    for entry in walk_tree(root):
        if entry.kind == "file":
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif entry.kind == "dir":
            fsync_dir(Path(entry.path))
    fsync_dir(Path(root))


def remove_tree(path: Path) -> None:
    """Remove a file, a link or a whole folder (any depth); nothing when it does not exist."""
    path = os.fspath(path)
    check_write(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return
    folders = [path]
    for entry in walk_tree(Path(path)):
        if entry.kind == "dir":
            folders.append(entry.path)
            if not entry.info.st_mode & stat.S_IWUSR:
                os.chmod(entry.path, stat.S_IMODE(entry.info.st_mode) | stat.S_IRWXU)
        else:
            os.unlink(entry.path)
    for folder in reversed(folders):  # a folder after everything inside it
        os.rmdir(folder)
