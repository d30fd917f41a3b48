"""The fault suite's harness: real daemons (tests.harness.lab.Lab) on real faults —
tmpfs mounts remounted read-only or filled to the last byte, a tmpfs mounted where a folder
should be, SIGSTOP, a clock skewed by libfaketime, deep trees — and the one check every case
ends with: where each dropped file is.

The promise checked (`check_evidence`): every file the lab dropped exists, byte for byte, in
exactly one of inbox/, a claimed folder in the work area, a published job's inputs/ or a failed
job's inputs/; no job id is both published and failed; every published job passes verify-audit;
and nothing unfinished is left in the outbox's work area but the jobs still claimed.

Mounting needs root (CI is root); where mount is refused the tests that need it skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon.claim import find_claims
from engine.provenance.verification import verify_audit
from engine.fsutil import walk_tree
from engine.jobfolder import AUDIT_FILE, ERROR_FILE, INPUTS_DIR, LEDGER_FILE, WORK_DIR
from tests.harness.lab import Lab

# A dropped file: (its path in the job folder, its bytes). A folder's drops may name one path
# twice (a photo replaced in a claimed folder: both versions are evidence).
Drop = tuple[str, bytes]


# ---------------------------------------------------------------------------- mounts

def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True)


def mount_or_skip(*arguments: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    made = _run("mount", *arguments)
    if made.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(arguments)}): {made.stderr.strip()}")


def tmpfs(folder: Path, size: str = "64m") -> Path:
    """A tmpfs of `size` mounted on `folder` (created): a disk of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    mount_or_skip("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    return folder


def set_read_only(folder: Path, read_only: bool) -> None:
    """Remount a mount point read-only or read-write again: a share that turned read-only."""
    made = _run("mount", "-o", "remount,ro" if read_only else "remount,rw", str(folder))
    assert made.returncode == 0, made.stderr


def unmount_all(root: Path) -> None:
    """Every mount under `root`, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        _run("umount", "-l", point.encode().decode("unicode_escape"))


@contextmanager
def filled(disk: Path) -> Iterator[Path]:
    """The file system of `disk` filled to its last byte, for the block."""
    filler = disk / ".filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    try:
        yield filler
    finally:
        filler.unlink()


def faketime_library() -> str | None:
    """libfaketime's multi-threaded build (Debian's faketime package), if installed."""
    for candidate in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                      "/usr/lib/faketime/libfaketimeMT.so.1"):
        if Path(candidate).is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------- where the evidence is

def drops_of(folder: Path) -> list[Drop]:
    """What a job folder holds, as Drops (walked without recursion: it may be deep)."""
    return [(entry.rel, Path(entry.path).read_bytes()) for entry in walk_tree(folder) if entry.kind == "file"]


def _origin(job_dir: Path) -> str | None:
    """The name of the dropped folder a published or failed job came from."""
    for path, key in ((job_dir / ERROR_FILE, "source"), (job_dir / AUDIT_FILE, "source")):
        if path.is_file():
            text = path.read_text("utf-8")
            record = json.loads(text.splitlines()[0] if path.name == AUDIT_FILE else text)
            if record.get(key):
                return Path(record[key]).name
    return None


def locations(lab: Lab) -> dict[str, list[tuple[str, Path]]]:
    """Dropped folder name -> every place that holds (part of) it: ("inbox" | "claimed" |
    "outbox" | "failed", the folder holding its files)."""
    found: dict[str, list[tuple[str, Path]]] = {}
    if lab.inbox.is_dir():
        for entry in sorted(lab.inbox.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                found.setdefault(entry.name, []).append(("inbox", entry))
    if lab.work.is_dir():
        for job in find_claims(lab.work):
            if job.has_folder():
                found.setdefault(job.claim.folder, []).append(("claimed", job.folder))
    for kind, base in (("outbox", lab.outbox), ("failed", lab.failed)):
        if not base.is_dir():
            continue
        for subject in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for job_dir in sorted(p for p in subject.iterdir() if p.is_dir() and not p.name.startswith(".")):
                origin = _origin(job_dir)
                if origin is not None:
                    found.setdefault(origin, []).append((kind, job_dir / INPUTS_DIR))
    return found


def check_evidence(lab: Lab, dropped: dict[str, list[Drop]], *, twice: set[str] = frozenset()) -> dict[str, list[str]]:
    """Every dropped file exists, byte-identical, in exactly one place (`twice`: folder names
    whose files may be in two: a mount point, copied to failed/ and left as mounted); no job id
    is both published and failed; every published job passes verify-audit; the outbox's work
    area holds only jobs that are still claimed. Returns folder name -> the kinds of place
    holding its files."""
    places = locations(lab)
    report: dict[str, list[str]] = {}
    for name, files in dropped.items():
        holders = places.get(name, [])
        report[name] = sorted({kind for kind, _ in holders})
        for rel, data in files:
            having = [kind for kind, root in holders if (root / rel).is_file() and not (root / rel).is_symlink() and (root / rel).read_bytes() == data]
            allowed = 2 if name in twice else 1
            assert len(having) == allowed, (f"{name}/{rel} ({len(data)} bytes) is in {having or 'no place'}, not in exactly {allowed}; "
                                            f"places of {name}: {[(k, str(r)) for k, r in holders]}")
    published = {job.name for subject in _subjects(lab.outbox) for job in subject.iterdir() if (job / "manifest.json").is_file()}
    failed = {job.name for subject in _subjects(lab.failed) for job in subject.iterdir() if (job / ERROR_FILE).is_file()}
    assert not published & failed, f"published and failed both: {sorted(published & failed)}"
    for subject in _subjects(lab.outbox):
        for job in subject.iterdir():
            if (job / "manifest.json").is_file():
                verified = verify_audit(job)
                assert verified.ok, (job, verified.problems)
    claimed = {job.job_id for job in find_claims(lab.work)} if lab.work.is_dir() else set()
    work = lab.outbox / WORK_DIR
    leftovers = [p.name for p in work.iterdir() if (p / LEDGER_FILE).exists() and p.name not in claimed] if work.is_dir() else []
    assert not leftovers, f"work folders of jobs nobody holds: {leftovers}"
    staging = [str(p) for subject in _subjects(lab.failed) for p in subject.iterdir() if p.name.endswith(".incoming")]
    assert not staging, f"half-made failed/ copies left behind: {staging}"
    return report


def _subjects(base: Path) -> list[Path]:
    return [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")] if base.is_dir() else []


def outcomes(*daemons) -> Counter:
    """job_ended outcomes over the daemons' logs."""
    return Counter(event["outcome"] for daemon in daemons for event in daemon.named("job_ended"))
