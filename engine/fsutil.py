"""Small file-system helpers shared by every layer: hashing, atomic writes, copying a job folder.

Every file another process may read is written to a temporary name in the same
folder, fsynced, and renamed over the target (maildir's tmp -> new), so a reader
or a crash never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from engine.faults import write_fault

_CHUNK = 1 << 20
# The temporary name atomic_write_bytes gives a file (mkstemp: ".<name>.<8 random characters>.tmp").
_PARTIAL_WRITE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fault(path)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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
    for path in sorted(root.rglob("*.tmp")):
        if path.is_file() and not path.is_symlink() and _PARTIAL_WRITE.fullmatch(path.name):
            path.unlink()
            removed.append(path.relative_to(root).as_posix())
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """Pretty, sorted JSON (stable bytes for equal values), written atomically."""
    atomic_write_text(path, json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def copy_folder_as_dropped(source: Path, target: Path) -> list[str]:
    """Copy a job folder as it was dropped (for failed/): files and folders, links as links,
    never followed (one may point anywhere, e.g. /etc/passwd). Named pipes, sockets and
    devices have no content to keep and reading one may block forever: they are left out,
    and their paths (relative to `source`) returned."""
    left_out: list[str] = []

    def special_files(folder: str, names: list[str]) -> list[str]:
        skipped = []
        for name in names:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                skipped.append(name)
                left_out.append(utf8_safe(os.path.relpath(os.path.join(folder, name), source)))
        return skipped

    shutil.copytree(source, target, symlinks=True, ignore=special_files)
    return left_out


def hash_tree(root: Path, relative_to: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (a file or a folder), keyed by POSIX path
    relative to `relative_to`. Temporary files of atomic writes are skipped."""
    root = Path(root)
    if root.is_file():
        return {root.relative_to(relative_to).as_posix(): sha256_file(root)}
    hashes: dict[str, str] = {}
    if not root.is_dir():
        return hashes
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.name.endswith(".tmp"):
            hashes[path.relative_to(relative_to).as_posix()] = sha256_file(path)
    return hashes
