"""The one cache of model files' sha256: every model's hashes (the diffusion models, the face
models, the landmarks, the second identity model, FaceID, the background remover) come from here.

A file is hashed once per content. A cached digest is used while the file's identity and stamp
are what they were when it was hashed: (device, inode, size, mtime_ns, ctime_ns). The ctime is in
the key because a file replaced in place and given its old mtime back (`touch -d`, `cp -p`) still
gets a new ctime, which only the kernel sets; so a swapped model is hashed again, and the audit
log records the file that is there now.

Two layers: this process's memory, and, for files under a models folder, `<models>/.hash-cache.json`
(so that a restarted daemon does not read a 5 GB checkpoint again: ~10 s). That file is the lab's
own (its models volume), written atomically, and read defensively: an entry that is not exactly
what this module writes is a miss. A read-only models volume only means the store is not updated.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from engine.fsutil import atomic_write_json, sha256_file

HASH_CACHE_FILE = ".hash-cache.json"  # under a models folder
VERSION = 2  # 1 keyed by (size, mtime_ns) only

log = structlog.get_logger("engine.hashcache")

_memory: dict[str, tuple[tuple[int, ...], str]] = {}  # resolved path -> (its key, sha256)
_lock = threading.Lock()


@dataclass
class Hashed:
    """The digests of a set of files, and what it cost (files actually read, their bytes)."""

    sha256: dict[str, str] = field(default_factory=dict)
    files_hashed: int = 0
    bytes_hashed: int = 0


def file_key(path: Path) -> tuple[int, ...]:
    """What says a file is still the one that was hashed. OSError when it is not there."""
    info = Path(path).stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def sha256_of(path: Path, models_dir: Path | None = None) -> str:
    """sha256 of one model file (see the module's docstring); `models_dir`: the models folder
    whose store remembers it across processes."""
    return sha256_of_files({"file": Path(path)}, models_dir).sha256["file"]


def sha256_of_files(files: dict[str, Path], models_dir: Path | None = None) -> Hashed:
    """sha256 of each file of `files` (name -> path), keyed by the same names."""
    result = Hashed()
    store: dict[str, Any] | None = None
    stored = False
    for name, path in files.items():
        resolved = str(Path(path).resolve())
        key = file_key(path)
        with _lock:
            known = _memory.get(resolved)
        if known is not None and known[0] == key:
            result.sha256[name] = known[1]
            continue
        if store is None:
            store = _read_store(models_dir) if models_dir is not None else {}
        entry = store.get(resolved)
        if isinstance(entry, dict) and tuple(entry.get("key") or ()) == key and _is_digest(entry.get("sha256")):
            digest = str(entry["sha256"])
        else:
            digest = sha256_file(Path(path))
            result.files_hashed += 1
            result.bytes_hashed += key[2]
            if file_key(path) != key:  # changed while it was read: use the digest, remember nothing
                result.sha256[name] = digest
                continue
            store[resolved] = {"key": list(key), "sha256": digest}
            stored = True
        with _lock:
            _memory[resolved] = (key, digest)
        result.sha256[name] = digest
    if stored and models_dir is not None and store is not None:
        _write_store(models_dir, store)
    return result


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_store(models_dir: Path) -> dict[str, Any]:
    path = Path(models_dir) / HASH_CACHE_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("hash_cache_unreadable", path=str(path), error=str(exc))
        return {}
    if not isinstance(stored, dict) or stored.get("version") != VERSION or not isinstance(stored.get("files"), dict):
        return {}
    return dict(stored["files"])


def _write_store(models_dir: Path, store: dict[str, Any]) -> None:
    path = Path(models_dir) / HASH_CACHE_FILE
    live = {key: entry for key, entry in sorted(store.items()) if Path(key).exists()}
    try:
        atomic_write_json(path, {"version": VERSION, "files": live})
    except OSError as exc:  # a read-only models volume: the hashes are still right, only not remembered
        log.warning("hash_cache_not_written", path=str(path), error=str(exc))
