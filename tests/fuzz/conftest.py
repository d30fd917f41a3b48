"""Fixtures for the fuzz tests that go past `load_job`: one engine on the demo model for the
whole session (runs of tests.harness.jobs.PREPARE_JOB stop after `prepare`, ~0.3 s each), and a
real photo with one face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fuzz_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the tiny demo diffusion model (faces: the embedded buffalo_s)."""
    from engine.diffusion.models import demo_model_dir, make_demo_model

    models = tmp_path_factory.mktemp("fuzz-models")
    make_demo_model(demo_model_dir(models))
    return models


@pytest.fixture(scope="session")
def fuzz_engine(fuzz_models: Path):
    from engine.config import Settings
    from engine.runner import Engine

    settings = Settings.from_table({"paths": {"models": str(fuzz_models)}}, root=fuzz_models.parent)
    return Engine(settings, demo=True)


@pytest.fixture(scope="session")
def face_rgb() -> np.ndarray:
    """scikit-image's astronaut, one real face, shrunk to 256 px to keep decoding cheap."""
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
