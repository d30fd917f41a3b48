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
from engine.faces import FaceModels, load_face_models
from engine.job import LoadedJob


class JobInterrupted(Exception):
    """A stop was requested (SIGTERM); the job stopped at a safe point and can be resumed."""

    def __init__(self, where: str) -> None:
        super().__init__(f"stopped at {where}")
        self.where = where


class Resources:
    """Models loaded once per process and shared by every job (the daemon keeps one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._faces: FaceModels | None = None
        self._background: BackgroundRemover | None = None

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

    def background(self) -> BackgroundRemover | None:
        """The rembg remover, or None when no model is staged (the caller decides what that means)."""
        if self._background is None and self.background_model_path().is_file():
            self._background = BackgroundRemover(self.background_model_path(), threads=self.settings.faces.threads)
        return self._background


@dataclass
class StageContext:
    job: LoadedJob
    job_dir: Path
    settings: Settings
    resources: Resources
    audit: AuditLog
    demo: bool = False
    log: Any = field(default_factory=lambda: structlog.get_logger("engine"))
    models_used: dict[str, str] = field(default_factory=dict)  # model name -> sha256, for the manifest
    observer: Observer | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def progress(self, event: str, **fields: Any) -> None:
        """Report progress that is not worth an audit line (a training step, a seed rendered)."""
        if self.observer is not None:
            self.observer(event, fields)

    def check_stop(self, where: str) -> None:
        """Called at safe points (after a checkpoint): leaves the job resumable if a stop was asked for."""
        if self.stop_requested.is_set():
            raise JobInterrupted(where)

    def path(self, relative: str) -> Path:
        return self.job_dir / relative
