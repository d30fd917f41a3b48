"""What a stage is given: the job, its folder, the settings, the audit log, loaded models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import threading

from engine.audit import AuditLog, Observer
from engine.background import BackgroundRemover, staged_model_path
from engine.config import Settings
from engine.errors import ConfigError, JobInterrupted, OwnershipLost  # noqa: F401 - JobInterrupted is re-exported for the stages
from engine.faces import FaceModels, load_face_models
from engine.jobfolder import Fence, NoFence
from engine.job import LoadedJob


class Resources:
    """Models loaded once per process and shared by every job (the daemon keeps one)."""

    def __init__(self, settings: Settings, demo: bool = False) -> None:
        self.settings = settings
        self.demo = demo
        self._faces: FaceModels | None = None
        self._background: BackgroundRemover | None = None
        self._pipelines: dict[str, Any] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._keys: Any = None
        self._credentials: Any = None

    def faces(self) -> FaceModels:
        if self._faces is None:
            s = self.settings.faces
            self._faces = load_face_models(
                self.settings.models_dir, s.pack, require_pack=s.require_pack, detect_size=s.detect_size,
                detect_threshold=s.detect_threshold, providers=s.providers, threads=s.threads,
            )
        return self._faces

    def background_model_path(self) -> Path:
        return staged_model_path(self.settings.models_dir, self.settings.background.model)

    def model_ref(self, role: str) -> Any:
        """Where the `base` or `realism` model is (ConfigError naming what to stage where).

        With demo on, both are the tiny generated model: it is never used otherwise."""
        from engine.models import resolve_model

        models = self.settings.models
        name, config = (models.base, models.base_config) if role == "base" else (models.realism, models.realism_config)
        return resolve_model(name, config, self.settings, demo=self.demo, role=role)

    def pipeline(self, role: str = "base") -> Any:
        """The loaded diffusion pipeline of `role`, loaded once per process."""
        if role not in self._pipelines:
            if role == "realism" and self.demo:
                self._pipelines[role] = self.pipeline("base")
            else:
                from engine.models import load_pipeline

                self._pipelines[role] = load_pipeline(self.model_ref(role), self.settings)
        return self._pipelines[role]

    def model_hashes(self, role: str = "base") -> dict[str, str]:
        """sha256 of every weight file of the model of `role`, keyed '<role>/<file>'."""
        if role not in self._hashes:
            from engine.models import model_files_hashes

            self._hashes[role] = {f"{role}/{name}": digest for name, digest in model_files_hashes(self.model_ref(role)).items()}
        return self._hashes[role]

    def base_model_hashes(self) -> dict[str, str]:
        return self.model_hashes("base")

    def realism_model_hashes(self) -> dict[str, str]:
        return self.model_hashes("realism")

    def realism_pipeline(self) -> Any:
        return self.pipeline("realism")

    def keys(self) -> Any:
        """The lab's keys (engine.trust.LabKeys) from [trust] keys, or None: records are unsigned.
        ConfigError naming what is missing where; `[trust] require` refuses to go unsigned."""
        if self._keys is None:
            from engine.trust import LabKeys

            folder = self.settings.keys_dir
            if folder is None:
                if self.settings.trust.require:
                    raise ConfigError("keys_missing", "[trust] require = true, but [trust] keys names no folder: make lab keys with "
                                                      "`python -m engine keys init --out DIR` and set [trust] keys = DIR")
                self._keys = False
            else:
                self._keys = LabKeys.load(folder)
        return self._keys or None

    def trust_facts(self) -> dict[str, Any]:
        """Who signs this installation's records (for the audit log and the report)."""
        from engine.trust import UNSIGNED_FACTS

        keys = self.keys()
        return keys.facts() if keys is not None else dict(UNSIGNED_FACTS)

    def credentials(self) -> Any:
        """The C2PA signer of generated images (engine.credentials), or None without keys."""
        if self._credentials is None:
            keys = self.keys()
            if keys is None:
                self._credentials = False
            else:
                from engine.credentials import ContentCredentials

                self._credentials = ContentCredentials(keys)
        return self._credentials or None

    def background(self) -> BackgroundRemover | None:
        """The rembg remover, or None when no model is staged (the caller decides what that means)."""
        if self._background is None and self.background_model_path().is_file():
            self._background = BackgroundRemover(self.background_model_path(), threads=self.settings.faces.threads)
        return self._background


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
    models_used: dict[str, str] = field(default_factory=dict)  # model name -> sha256, for the manifest
    observer: Observer | None = None
    fingerprint: str = ""  # of the stage running now (checkpoints are only valid for it)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    fence: Fence = field(default_factory=NoFence)  # the job's owner (the daemon's claim); see Engine.run_job

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

    @property
    def training_resolution(self) -> int:
        """The side, in pixels, the LoRA is trained and seeds and renders are made at: the demo
        model's own 128 px, else train.resolution (one owner; stages used to ask the train stage)."""
        from engine.models import DEMO_RESOLUTION

        return DEMO_RESOLUTION if self.demo else self.job.spec.train.resolution

    def path(self, relative: str) -> Path:
        return self.job_dir / relative

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
                                        ingredients=list(zip(self.job.spec.subject.photos, self.job.photos)))
        atomic_write_bytes(self.path(relative), data)
        return "signed" if credentials is not None else "unsigned"
