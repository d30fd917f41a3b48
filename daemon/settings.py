"""config.toml's [daemon] table and the folders it names. Apart from the service so that
readers of the shared folders (`python -m daemon status`) need not import the engine's model stack."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from engine import ConfigError, Settings
from engine.jobfolder import FolderSettings, is_hidden_name, probe_folder, probe_job_targets, probe_rename
from engine.schema import Bool, Float, Int, Str, Table, build_section, rule

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RaySettings:
    """config.toml's [daemon.ray]: where the jobs run when [daemon] backend = "ray" (daemon/cluster.py)."""

    # The cluster's GCS address ("10.0.0.5:6379"); "auto": the cluster this host's `ray start` joined
    # (or RAY_ADDRESS); "local": start a private one-node cluster in this process (a single box, and
    # the tests), whatever RAY_ADDRESS says and whatever other cluster runs on the host.
    address: str = field(default="auto", metadata=rule(Str(min_len=1, max_len=255)))
    # A cluster named by address (anything but "local") must answer within this long, else the
    # daemon refuses to start (ray_unreachable); a SIGTERM meanwhile stops it at once.
    connect_timeout_seconds: float = field(default=30.0, metadata=rule(Float(1.0, 3600.0)))
    # A job whose attempt was lost with its node (node death, raylet killed, network cut) runs
    # again on another node at most this many times in a row; then it goes to failed/ as
    # too_many_crashes. Each lost attempt also counts in the claim's crashes ([daemon] max_crashes).
    max_retries: int = field(default=3, metadata=rule(Int(0, 100)))
    gpus_per_job: float = field(default=1.0, metadata=rule(Float(0.0, 64.0)))
    cpus_per_job: float = field(default=1.0, metadata=rule(Float(0.0, 1024.0)))
    # How many jobs at once (one worker each): 0 = the cluster's GPUs / gpus_per_job at start.
    workers: int = field(default=0, metadata=rule(Int(0, 1024)))
    # true: one long-lived worker (a Ray actor) per slot keeps the engine and its models loaded
    # across jobs; false: a fresh worker process per job (every job pays the model load).
    keep_models_loaded: bool = field(default=True, metadata=rule(Bool()))
    namespace: str = field(default="idrep", metadata=rule(Str(pattern=r"[A-Za-z0-9_.-]{1,64}", pattern_doc="1-64 characters from A-Z a-z 0-9 _ . -")))


@dataclass(frozen=True)
class DaemonSettings(FolderSettings):
    """config.toml's [daemon] table: the folders (inbox, outbox, failed, work: engine.jobfolder's
    FolderSettings, which `python -m engine` reads too; relative to the config file's folder),
    then the daemon's own keys."""

    # A folder with job.toml is ready when nothing in it changed for this long (or at once with a READY file).
    stable_seconds: float = field(default=10.0, metadata=rule(Float(0.0, 86_400.0)))
    # Full listing of the inbox and the work area, whatever the watcher reported.
    scan_seconds: float = field(default=10.0, metadata=rule(Float(0.1, 3600.0)))
    # A claim not renewed for this long is taken over by another daemon (renewed every lease/3).
    lease_seconds: float = field(default=60.0, metadata=rule(Float(0.5, 86_400.0)))
    # The inbox is a network share (SMB/NFS): inotify sees no remote writes, so poll.
    network_share: bool = field(default=False, metadata=rule(Bool()))
    poll_seconds: float = field(default=2.0, metadata=rule(Float(0.1, 600.0)))
    metrics_port: int = field(default=9108, metadata=rule(Int(0, 65535)))  # 0: any free port (logged)
    metrics_host: str = field(default="127.0.0.1", metadata=rule(Str(min_len=1, max_len=255)))
    # Unique among the daemons sharing an inbox; a daemon restarted with the same id resumes
    # its own claims at once instead of waiting for their leases. "": <host>-<pid>.
    daemon_id: str = field(default="", metadata=rule(Str(pattern=r"(|[A-Za-z0-9][A-Za-z0-9._@-]{0,127})", pattern_doc="1-128 characters from A-Z a-z 0-9 . _ @ -")))
    # A job whose runs ended without a clean stop this many times (the daemon was killed, ran
    # out of memory, ...) goes to failed/ instead of taking down one daemon after another.
    max_crashes: int = field(default=3, metadata=rule(Int(1, 100)))
    # A job held because the disk, share or permissions failed it (disk_full, outbox_unwritable,
    # io_error) is retried after this long, doubled at each hold in a row up to an hour.
    hold_retry_seconds: float = field(default=30.0, metadata=rule(Float(0.1, 3600.0)))
    # The modes of everything the daemon writes (outputs, failed/ copies): "022" gives 0644 files
    # and 0755 folders, "027" keeps others out. "": the umask the daemon was started with.
    umask: str = field(default="", metadata=rule(Str(pattern=r"(|0?[0-7]{3})", pattern_doc='"" or three octal digits, e.g. "022" or "027"')))
    # While a model the configuration needs is missing, the daemon serves /metrics (idrep_ready
    # 0), logs models_missing naming every file and where it goes, and looks again this often.
    models_retry_seconds: float = field(default=30.0, metadata=rule(Float(0.1, 3600.0)))
    # Where claimed jobs run: "local" (this process, one at a time) or "ray" (a Ray cluster's
    # GPU workers, one job per worker at once; [daemon.ray]; `pip install .[ray]`).
    backend: str = field(default="local", metadata=rule(Str(choices=BACKENDS)))
    ray: RaySettings = field(default_factory=RaySettings, metadata=rule(Table(RaySettings)))


def load_daemon_settings(settings: Settings, where: str = "config.toml") -> DaemonSettings:
    """Validate the [daemon] table the engine passed through; every problem named at once."""
    return build_section(DaemonSettings, settings.foreign.get("daemon", {}), "daemon", where)


def default_daemon_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class DaemonPaths:
    inbox: Path
    outbox: Path
    failed: Path
    work: Path

    @classmethod
    def resolve(cls, daemon: DaemonSettings, root: Path) -> "DaemonPaths":
        folders = daemon.folders(root)  # the rule `python -m engine` follows too
        return cls(inbox=folders.inbox, outbox=folders.outbox, failed=folders.failed, work=folders.work)

    def prepare(self) -> None:
        """Create the folders; refuse layouts that would lose atomicity or be mistaken for jobs,
        and folders that cannot be written (ConfigError naming each path and its fault)."""
        for name, path in (("outbox", self.outbox), ("failed", self.failed), ("work", self.work)):
            if path == self.inbox or (path.is_relative_to(self.inbox) and not is_hidden_name(path.relative_to(self.inbox).parts[0])):
                raise ConfigError("invalid_config", f"the {name} folder {path} is inside the inbox {self.inbox}, where it would be taken for a job folder")
        problems = self.probe()
        if problems:
            raise ConfigError("folder_unusable", "; ".join(problems))

    def probe(self) -> list[str]:
        """Every folder the daemon writes must take a file (create, write, fsync, rename, remove),
        and the renames that hand a job on must be atomic: inbox -> work (claiming; two bind
        mounts of one file system fail here too, with EXDEV, as they would later) and the
        outbox's work area -> the outbox (publishing). [] when all is well."""
        problems = [problem for path in (self.inbox, self.work) if (problem := probe_folder(path)) is not None]
        problems += probe_job_targets(self.outbox, self.failed)
        if not problems:
            claiming = probe_rename(self.inbox, self.work, f"the work area {self.work} is not on the inbox's file system or mount "
                                    f"({self.inbox}): claiming a job is a rename, which must be atomic; set [daemon] work to a folder on "
                                    'the same share and mount, e.g. a hidden folder inside the inbox (work = "inbox/.work")')
            problems += [claiming] if claiming is not None else []
        return problems
