"""What a stage is given: the job, its folder, the settings, the audit log, loaded models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from engine.audit import AuditLog
from engine.background import BackgroundRemover, staged_model_path
from engine.config import Settings
from engine.faces import FaceModels, load_face_models
from engine.job import LoadedJob


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

    def path(self, relative: str) -> Path:
        return self.job_dir / relative
