"""Shared fixtures: real photos from packages, a settings object on an empty models folder, the
shared demo models folder. Nothing here downloads anything; the helpers tests import are in
tests/harness/."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.harness.paths import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip themselves where CUDA is absent (CI has no GPU)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _structlog_as_it_was():
    """A test that calls a CLI's main() configures structlog to print to the stream pytest
    captured for it; later tests must not log to that closed stream."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def group_rgb() -> np.ndarray:
    """insightface's t1.jpg: six people in a row."""
    import insightface
    from PIL import Image

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="session")
def no_face_rgb() -> np.ndarray:
    """scikit-image's coffee cup: a real photo with no face in it."""
    from skimage import data

    return data.coffee()


@pytest.fixture()
def settings(tmp_path: Path):
    """Built-in defaults on an empty models folder (faces: embedded buffalo_s; no rembg model)."""
    from engine.config import Settings

    (tmp_path / "models").mkdir()
    return Settings.from_table({"paths": {"models": str(tmp_path / "models")}}, root=tmp_path)


@pytest.fixture()
def engine(settings):
    """An engine on the demo diffusion model (built into the test's models folder)."""
    from engine.runner import Engine

    return Engine(settings, demo=True)


@pytest.fixture(scope="session")
def face_models():
    from engine.identity.faces import load_face_models

    return load_face_models(Path("/nonexistent-models"), "buffalo_l")


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models folder for every test that runs daemon subprocesses (e2e, fuzz, faults): the tiny
    demo model is built into it once here, instead of by the first daemon of every test (~30 s each)."""
    models = tmp_path_factory.mktemp("models")
    if importlib.util.find_spec("engine.diffusion.models") is not None:
        build = "import sys; from pathlib import Path; from engine.diffusion.models import demo_model_dir, make_demo_model; make_demo_model(demo_model_dir(Path(sys.argv[1])))"
        subprocess.run([sys.executable, "-c", build, str(models)], cwd=REPO, check=True, capture_output=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    return models
