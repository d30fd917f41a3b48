"""What a stage is given (`StageContext`): the job, its folder, the settings, the audit log, and
the models it declared (through `use`, from engine.resources)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import threading

from engine.provenance.audit import AuditLog, Observer
from engine.config import Settings
from engine.errors import JobInterrupted, OwnershipLost  # noqa: F401 - JobInterrupted is re-exported for the stages
from engine.jobfolder import Fence, NoFence
from engine.job import LoadedJob
from engine.resources import Resources


@dataclass
class StageContext:
    job: LoadedJob
    job_id: str
    job_dir: Path
    settings: Settings
    resources: Resources
    audit: AuditLog
    demo: bool = False
    log: Any = field(default_factory=lambda: structlog.get_logger("engine"))
    models_used: dict[str, str] = field(default_factory=dict)  # model file -> sha256 of the models `use`d, for the manifest
    models_declared: tuple[str, ...] = ()  # the roles the running stage declared (its `models(ctx)`)
    observer: Observer | None = None
    fingerprint: str = ""  # of the stage running now (checkpoints are only valid for it)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    fence: Fence = field(default_factory=NoFence)  # the job's owner (the daemon's claim); see Engine.run_job
    _recorded: tuple[str, dict[str, str]] | None = field(default=None, repr=False)  # (fingerprint, files this stage run recorded)

    def use(self, role: str) -> Any:
        """The loaded model of `role` (engine.resources), recorded with its files' hashes in
        `models_used`. Only a role the stage declared: a model its fingerprint does not cover
        would change its results without re-doing it."""
        if role not in self.models_declared:
            raise RuntimeError(f"the stage uses the {role!r} model but declares only {', '.join(self.models_declared) or 'none'} (its models(ctx))")
        model = self.resources.model(role)
        if model is not None:
            self.models_used.update(self.resources.hashes(role))
        return model

    def progress(self, event: str, **fields: Any) -> None:
        """Report progress that is not worth an audit line (a training step, a seed rendered)."""
        if self.observer is not None:
            self.observer(event, fields)

    def check_stop(self, where: str) -> None:
        """Called at safe points (after a checkpoint, before every image, at every denoising
        step): stops a job whose claim was lost (OwnershipLost), or one asked to stop (SIGTERM:
        JobInterrupted, the job stays resumable). Touches no disk: cheap enough for every step."""
        self.fence.check(where, io=False)
        if self.stop_requested.is_set():
            raise JobInterrupted(where)

    def model_side(self, resolution: int) -> int:
        """The side, in pixels, a model works at when the job asks for `resolution`: the demo
        model's own 128 px (engine.diffusion.models.DEMO_RESOLUTION), whatever the job asks, else
        `resolution`. The one place the demo overrides a job's resolution."""
        from engine.diffusion.models import DEMO_RESOLUTION

        return DEMO_RESOLUTION if self.demo else resolution

    @property
    def training_resolution(self) -> int:
        """The side, in pixels, the LoRA is trained and seeds and renders are made at: train.resolution,
        or the demo model's own (model_side); one owner, stages used to ask the train stage."""
        return self.model_side(self.job.spec.train.resolution)

    def path(self, relative: str) -> Path:
        return self.job_dir / relative

    def write_recorded(self, event: str, files: dict[str, bytes], **fields: Any) -> dict[str, str]:
        """Write files the running stage may read back when an interrupted run resumes (its
        scratch: checkpoints, finished batches), each atomically, then record their sha256 in
        one audit line `event` (one of engine.provenance.audit.RECORDING_EVENTS) with `fields`. Returns
        the hashes. Only what is recorded so is ever read back (`read_recorded`)."""
        from engine.fsutil import atomic_write_bytes, sha256_bytes

        digests = {}
        for relative, data in files.items():
            atomic_write_bytes(self.path(relative), data)
            digests[relative] = sha256_bytes(data)
        self.audit.event(event, **fields, files=digests)
        if self._recorded is not None and self._recorded[0] == self.fingerprint:
            self._recorded[1].update(digests)
        return digests

    def _trusted_chain(self) -> list[dict[str, Any]]:
        """The audit chain's lines a resume may trust (engine.provenance.verification.trusted_records: with
        lab keys, what the signer witnessed)."""
        from engine.provenance.audit import read_chain
        from engine.layout import WITNESS_FILE
        from engine.provenance.verification import trusted_records

        key = self.resources.lab_public_key() if self.resources is not None else None
        return trusted_records(read_chain(self.audit.path).records, self.job_dir / WITNESS_FILE, self.job_id, key)[0]

    def read_recorded(self, relative: str, **fields: Any) -> bytes | None:
        """The bytes of `relative` when they are what this stage run recorded (`write_recorded`),
        else None: absent, or not as recorded (another hash, never recorded by this run, not a
        regular file). A file that is there but not as recorded is audited
        `resume_artifact_mismatch` (file, expected sha256 or None, found, `fields`) and deleted.
        Hashed and returned from one read: what is parsed is what was checked."""
        from engine.provenance.audit import recorded_files
        from engine.fsutil import remove_tree, sha256_bytes

        path = self.path(relative)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        if self._recorded is None or self._recorded[0] != self.fingerprint:
            self._recorded = (self.fingerprint, recorded_files(self._trusted_chain(), self.fingerprint))
        expected = self._recorded[1].get(relative)
        if stat.S_ISREG(info.st_mode):
            data = path.read_bytes()
            found = sha256_bytes(data)
            if found == expected:
                return data
        else:
            found = f"not a regular file (mode {stat.filemode(info.st_mode)})"
        self.audit.event("resume_artifact_mismatch", file=relative, expected=expected, found=found,
                         reason="not recorded by this stage run" if expected is None else "not as recorded", **fields)
        self.log.warning("resume_artifact_mismatch", file=relative, expected=expected, found=found, **fields)
        remove_tree(path)
        return None

    def write_generated_image(self, relative: str, rgb: Any, text: dict[str, str], facts: dict[str, Any]) -> str:
        """Write an image the model generated: a PNG with its text chunks and, with lab keys, C2PA
        Content Credentials (created by a trained model, from the job's photos, `facts` as our
        assertion). Returns "signed" or "unsigned", for the records that list the image."""
        from engine.fsutil import atomic_write_bytes
        from engine.images import png_bytes

        data = png_bytes(rgb, text)
        credentials = self.resources.credentials()
        if credentials is not None:
            data = credentials.sign_png(data, title=Path(relative).name, facts={"job_id": self.job_id, "demo": self.demo, **facts},
                                        ingredients=list(zip(self.job.spec.subject.photos, self.job.photos)), job_dir=self.job_dir)
        atomic_write_bytes(self.path(relative), data)
        return "signed" if credentials is not None else "unsigned"
