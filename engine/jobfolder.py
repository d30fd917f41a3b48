"""The job-folder vocabulary: where a job lives on disk at each step of its life, what its files
are called, how a finished or failed job is found, and the one code that publishes a failure.

    <outbox>/.work/<job-id>/           while it runs: inputs/ (the dropped folder, copied and
                                       verified before anything reads it), state.json (ledger),
                                       audit.jsonl, the outputs so far
    <outbox>/<subject>/<job-id>/       finished: the work folder, moved here in one rename, with
                                       manifest.json and signature.json (its signed head)
    <failed>/<subject>/<job-id>/       refused or failed: inputs/ (the dropped folder as it was),
                                       error.json, audit.jsonl, signature.json
    <outbox>/.journal/journal.jsonl    one signed line per published or failed job (engine.provenance.trust)

The daemon (which knows nothing of diffusion) imports this module and the `engine` package's
public names, nothing else of the engine: the names, the look-ups, the publishing order and the
disk discipline it shares with the engine all live here.

Publishing a failure is always: copy -> verify (by hash) -> fsync -> one rename into failed/.
Any step that fails raises OSError and leaves failed/ as it was; the caller keeps the input
where it is (the engine's work folder, the daemon's claim) and tries again later.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import JobError, OwnershipLost  # noqa: F401 - OwnershipLost is part of this vocabulary (fences raise it)
from engine.fsutil import unguarded_writes  # noqa: F401 - the daemon's claim renews under the job's write guard
from engine.fsutil import json_bytes, restamp  # noqa: F401 - the daemon renews leases in place (a full disk takes no new file)
from engine.fsutil import (Listing, TreeLimit, atomic_write_bytes, atomic_write_json, copy_tree, fsync_dir, fsync_tree, remove_tree,  # noqa: F401
                           set_umask, share_modes, shared_file_mode, tree_listing, utf8_safe, walk_tree)
from engine.job import JOB_FILE, MAX_FOLDER_DEPTH, MAX_FOLDER_ENTRIES, is_hidden_name, is_temporary_name, safe_subject_name  # noqa: F401
from engine.kinds.sections import MAX_PHOTOS
from engine.kinds import all_stage_names  # noqa: F401 - plain data: the daemon's metrics label stages with it
# The job folder's own files: named in engine.layout (the one owner of names inside a job folder),
# part of this vocabulary for the daemon.
from engine.layout import (AUDIT_FILE, DAMAGED_AUDIT_PREFIX, ERROR_FILE, INPUTS_DIR, LEDGER_FILE, MANIFEST_FILE, SIGNATURE_FILE,  # noqa: F401
                           WITNESS_FILE)
# Where a job is while it runs and while its failure is sealed: places the provenance modules
# (below this one) need too, so engine.layout has them.
from engine.layout import INCOMING_SUFFIX as _INCOMING, WORK_DIR, failure_staging, work_dir  # noqa: F401
from engine.schema import Str, rule


# errno values that say the installation (disk, share, permissions), not the job, is at fault.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
SHARE_TROUBLE = frozenset({errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                           errno.ENODEV, errno.ENXIO, errno.ENOLINK, errno.EREMOTEIO, errno.ECONNRESET, errno.ECONNABORTED})


@dataclass(frozen=True)
class Folders:
    """The folders a job passes through, absolute: inbox/ -> work/ -> outbox/ | failed/."""

    inbox: Path
    outbox: Path
    failed: Path
    work: Path


@dataclass(frozen=True)
class FolderSettings:
    """config.toml's names for those folders, in its [daemon] table (daemon/settings.py's
    DaemonSettings extends this with the rest of it): relative to config.toml's folder, or
    absolute. Declared in the engine so that `python -m engine` (engine.cli.configured_folders)
    finds the daemon's folders without importing the daemon."""

    inbox: str = field(default="inbox", metadata=rule(Str(min_len=1, max_len=4096)))
    outbox: str = field(default="outbox", metadata=rule(Str(min_len=1, max_len=4096)))
    failed: str = field(default="", metadata=rule(Str(max_len=4096)))  # "": failed/ beside the outbox
    # Claimed jobs; must be on the inbox's file system (claiming is a rename). "": work/ beside the inbox.
    work: str = field(default="", metadata=rule(Str(max_len=4096)))

    def folders(self, root: Path) -> Folders:
        """The folders, taken from `root` (config.toml's folder): the one rule for both CLIs and the daemon."""
        inbox = (Path(root) / self.inbox).resolve()
        outbox = (Path(root) / self.outbox).resolve()
        failed = (Path(root) / self.failed).resolve() if self.failed else outbox.parent / "failed"
        work = (Path(root) / self.work).resolve() if self.work else inbox.parent / "work"
        return Folders(inbox=inbox, outbox=outbox, failed=failed, work=work)


class Fence(Protocol):
    """The owner of a job, as the engine sees it (the daemon's claim). `token` (the claim's
    generation) goes into every audit line; `check` raises OwnershipLost when this process no
    longer owns the job. `io=False` asks only what is known without touching the disk (the
    engine asks that at every denoising step)."""

    token: int

    def check(self, what: str, *, io: bool = True) -> None: ...


class NoFence:
    """A job run by `python -m engine run`: nobody else can own it."""

    token = 0

    def check(self, what: str, *, io: bool = True) -> None:
        return None


# ---------------------------------------------------------------------------- where things are

def new_job_id() -> str:
    """Sortable and unique across daemons: UTC time + 24 random bits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def find_published(outbox: Path, failed: Path, job_id: str) -> tuple[str, Path] | None:
    """("finished", its folder) when `job_id` is in the outbox (its manifest is there), ("failed",
    its folder) when it is in failed/ (its error.json is there), else None."""
    for base, marker, outcome in ((Path(outbox), MANIFEST_FILE, "finished"), (Path(failed), ERROR_FILE, "failed")):
        try:
            subjects = [entry.name for entry in os.scandir(base) if not is_hidden_name(entry.name) and entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
        for subject in subjects:
            folder = base / subject / job_id
            if (folder / marker).is_file():
                return outcome, folder
    return None


def kept_inputs(outbox: Path, job_id: str) -> tuple[str, Path | None]:
    """What the engine kept of a job it started: (the subject job.toml named, "" when it was never
    read; the verified inputs/ copy of the dropped folder, None when there is none yet)."""
    from engine.ledger import Ledger

    folder = work_dir(outbox, job_id)
    ledger = Ledger.peek(folder / LEDGER_FILE) or {}
    copied = folder / INPUTS_DIR if ledger.get("inputs") and (folder / INPUTS_DIR).is_dir() else None
    return str(ledger.get("subject") or ""), copied


def remove_leftover_work(outbox: Path, job_id: str) -> bool:
    """Remove the work folder of a job that is already published (a kill between the publishing
    rename and the clean-up leaves it). True when there was one."""
    leftover = work_dir(outbox, job_id)
    if not leftover.exists():
        return False
    remove_tree(leftover)
    return True


# ---------------------------------------------------------------------------- the dropped folder

def check_dropped_folder(folder: Path) -> None:
    """Refuse a tree no job folder is (too deep, too many entries) before copying it: JobError
    naming where. A job is 1-3 photos and job.toml; a few sub-folders of notes are fine."""
    try:
        for _ in walk_tree(folder, max_depth=MAX_FOLDER_DEPTH, max_entries=MAX_FOLDER_ENTRIES):
            pass
    except TreeLimit as limit:
        if limit.limit == "levels":
            raise JobError("too_deep", f"{limit.where}: the job folder nests folders more than {MAX_FOLDER_DEPTH} levels deep; "
                                       f"a job folder holds 1-{MAX_PHOTOS} photos and {JOB_FILE}", details={"max_depth": MAX_FOLDER_DEPTH}) from None
        raise JobError("too_many_files", f"the job folder holds more than {MAX_FOLDER_ENTRIES} files and folders; a job folder holds "
                                         f"1-{MAX_PHOTOS} photos and {JOB_FILE}", details={"max_entries": MAX_FOLDER_ENTRIES}) from None


def copy_verified(source: Path, target: Path) -> Listing:
    """Copy the folder `source` to `target` through `<target>.incoming`: copy, compare every
    file's hash with the bytes read, fsync, then one rename. Returns the Listing of the copy.
    OSError when any step fails (`target` is then left as it was)."""
    target = Path(target)
    staging = target.with_name(target.name + _INCOMING)
    remove_tree(staging)
    try:
        copied = copy_tree(source, staging)
        _verify_copy(copied, staging)
        fsync_tree(staging)
    except BaseException:
        _remove_quietly(staging)  # a half copy on a full disk would only keep it full
        raise
    remove_tree(target)
    os.rename(staging, target)
    fsync_dir(target.parent)
    return copied


def _remove_quietly(path: Path) -> None:
    try:
        remove_tree(path)
    except (OSError, OwnershipLost):
        pass


def _verify_copy(copied: Listing, folder: Path) -> None:
    found = tree_listing(folder)
    if found.entries != copied.entries:
        differences = copied.differences(found)
        raise OSError(errno.EIO, f"the copy differs from what was read: {differences}", str(folder))


def inputs_changed(folder: Path, job_dir: Path) -> dict[str, list[str]] | None:
    """How the folder `folder` differs from the `inputs/` copy of the job in `job_dir`
    ({added, changed, removed}), or None when they are the same."""
    differences = tree_listing(job_dir / INPUTS_DIR).differences(tree_listing(folder))
    return differences if any(differences.values()) else None


# ---------------------------------------------------------------------------- what went wrong

def classify_os_error(exc: OSError) -> str | None:
    """The failure code of an OSError that the installation (not the job) is to blame for:
    disk_full, outbox_unwritable or io_error; None for anything else."""
    if exc.errno in DISK_FULL:
        return "disk_full"
    if exc.errno in UNWRITABLE:
        return "outbox_unwritable"
    if exc.errno in SHARE_TROUBLE or exc.errno == errno.EXDEV:
        return "io_error"
    return None


def describe_os_error(exc: OSError) -> str:
    """'<strerror> (<path>)', the form every message about a disk fault takes."""
    where = exc.filename if exc.filename is not None else "no file name"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{exc.strerror or exc} ({utf8_safe(str(where))})"


def probe_folder(folder: Path) -> str | None:
    """Create, write, fsync, rename and remove a probe file in `folder` (created if missing).
    None when all of it works, else what failed, naming the folder."""
    folder = Path(folder)
    probe = folder / f".idrep-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(probe, probe.with_name(probe.name + ".renamed"))
        os.unlink(probe.with_name(probe.name + ".renamed"))
        fsync_dir(folder)
    except OSError as exc:
        for leftover in (probe, probe.with_name(probe.name + ".renamed")):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        return f"{folder}: cannot be written: {exc.strerror or exc}{_who_may_write(folder, exc)}"
    return None


def _who_may_write(folder: Path, exc: OSError) -> str:
    """For a refused permission: who this process is and whose the folder is (a container run as
    the invoking user, a share mounted for another uid, a folder docker created as root)."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        info = where.stat()
    except OSError:
        return ""
    return (f" (this process runs as uid {os.getuid()} gid {os.getgid()}; {where} belongs to uid {info.st_uid} gid {info.st_gid}, "
            f"mode {stat.S_IMODE(info.st_mode):04o}: make it writable for this uid, or run as its owner)")


def probe_rename(source_folder: Path, target_folder: Path, exdev_message: str) -> str | None:
    """Rename a probe folder from one folder to another: the renames that hand a job on
    (claiming, publishing) must be atomic, i.e. within one file system and one mount. None when it
    works; `exdev_message` when the two are on different file systems; else what failed."""
    probe = Path(source_folder) / f".idrep-rename-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"{source_folder}: cannot be written: {exc.strerror or exc}"
    try:
        os.rename(probe, Path(target_folder) / probe.name)
    except OSError as exc:
        probe.rmdir()
        return exdev_message if exc.errno == errno.EXDEV else f"{target_folder}: cannot be written: {exc.strerror or exc}"
    (Path(target_folder) / probe.name).rmdir()
    return None


def probe_job_targets(outbox: Path, failed: Path) -> list[str]:
    """Every problem that would stop a job from being worked on and published: the outbox, its
    work area and failed/ must be writable, and the work area must be on the outbox's file system
    (publishing is a rename). An empty list when all is well."""
    outbox, failed = Path(outbox), Path(failed)
    work = outbox / WORK_DIR
    problems = [problem for folder in (outbox, work, failed) if (problem := probe_folder(folder)) is not None]
    if not problems:
        renamed = probe_rename(work, outbox, f"the outbox's work area {work} is not on the outbox's file system or mount ({outbox}): "
                                             "publishing a finished job is a rename, which must be atomic; do not mount another disk there")
        if renamed is not None:
            problems.append(renamed)
    return problems


# ---------------------------------------------------------------------------- publishing a failure

def failure_record(job_id: str, subject: str, source: Path | str, error: JobError, **extra: Any) -> dict[str, Any]:
    """The content of error.json."""
    return {"job_id": job_id, "subject": subject, "source": utf8_safe(str(source)), "failed_at": _now(), **error.to_dict(), **extra}


def publish_failure(*, inputs_from: Path, failed_root: Path, subject: str, job_id: str, record: dict[str, Any],
                    audit: Path | None = None, check: Callable[[str], None] | None = None,
                    only: frozenset[str] | None = None, seal: Callable[[Path], Any] | None = None,
                    sealed: Callable[[Path], bool] | None = None) -> tuple[Path, dict[str, Any]]:
    """The one code that writes failed/: `failed/<subject>/<job-id>/` with inputs/ (a verified
    copy of the folder `inputs_from`, or of just the paths `only`), error.json (`record`, plus what
    could not be copied), a copy of the job's audit log (and of any damaged chain set aside beside
    it), manifest.json (the sha256 of every file of inputs/ and of the files beside it:
    `failed_manifest`), and what `seal(staging folder)` adds (the signed head over all of it).
    Copy -> verify -> manifest -> seal -> fsync -> `check("publish")` -> one rename.

    Returns (the folder, the record as written). Already published (a re-run after a kill): the
    folder as it is. A staging folder left sealed by an earlier try (`sealed(staging)` says it
    still is what was sealed) is published as it is: a job id is sealed once. OSError when a step
    fails: failed/ then holds no trace of this job but a hidden staging folder that the next try
    replaces (or, once sealed, publishes)."""
    import json

    target = Path(failed_root) / subject / job_id
    if (target / ERROR_FILE).is_file():
        return target, json.loads((target / ERROR_FILE).read_text("utf-8"))
    staging = failure_staging(failed_root, subject, job_id)
    if sealed is not None and staging.is_dir() and sealed(staging):
        if check is not None:
            check("publish to failed/")
        os.rename(staging, target)
        fsync_dir(target.parent)
        return target, json.loads((target / ERROR_FILE).read_text("utf-8"))
    remove_tree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    is_sealed = False
    try:
        os.mkdir(staging)
        copied = copy_tree(inputs_from, staging / INPUTS_DIR, only=only)
        _verify_copy(copied, staging / INPUTS_DIR)
        record = dict(record)
        if copied.left_out:
            record["details"] = {**record.get("details", {}), "not_copied": copied.left_out}
        atomic_write_json(staging / ERROR_FILE, record)
        if audit is not None and Path(audit).is_file():
            atomic_write_bytes(staging / AUDIT_FILE, Path(audit).read_bytes())
            for damaged in sorted(Path(audit).parent.glob(DAMAGED_AUDIT_PREFIX + "*")):
                atomic_write_bytes(staging / damaged.name, damaged.read_bytes())
        atomic_write_json(staging / MANIFEST_FILE, failed_manifest(staging, job_id=job_id, subject=subject, inputs=copied, only=only))
        share_modes(staging)
        if seal is not None:
            seal(staging)
            is_sealed = True
        fsync_tree(staging)
        if check is not None:
            check("publish to failed/")
        os.rename(staging, target)  # onto an existing, non-empty folder this fails: nothing of anyone's is replaced
    except BaseException:
        if not is_sealed:
            _remove_quietly(staging)  # nothing half-made stays in failed/ (nor fills a full disk); a sealed one is published next time
        raise
    fsync_dir(target.parent)
    return target, record


FAILED_MANIFEST_VERSION = 1


def failed_manifest(folder: Path, *, job_id: str, subject: str, inputs: Listing, only: frozenset[str] | None) -> dict[str, Any]:
    """manifest.json of a failed job's folder: what its signed head seals besides error.json and the
    audit log: the sha256 of every file beside inputs/ (those two, a damaged chain set aside), and
    above all the Listing of inputs/ (the dropped folder as it was, or the paths `only` of it)."""
    from engine.fsutil import sha256_file

    outputs = {entry.name: sha256_file(Path(entry.path)) for entry in os.scandir(folder)
               if entry.is_file(follow_symlinks=False) and entry.name not in (MANIFEST_FILE, SIGNATURE_FILE) and not is_temporary_name(entry.name)}
    return {"failed_manifest_version": FAILED_MANIFEST_VERSION, "failed": True, "job_id": job_id, "subject": subject,
            "inputs": inputs.entries, "not_copied": inputs.left_out, "only": sorted(only) if only else None, "outputs": outputs}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
