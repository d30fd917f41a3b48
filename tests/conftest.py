"""Shared fixtures: real photos from packages, a settings object on an empty models folder,
and job-folder builders. Nothing here downloads anything."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


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
    from engine.faces import load_face_models

    return load_face_models(Path("/nonexistent-models"), "buffalo_l")


# A job that runs the whole chain on the tiny demo model in a few seconds.
FAST_JOB = """\
[prepare]
size = 128
rotations = [-10, 10]
crops = [0.8]

[train]
rank = 4
max_steps = 8
checkpoint_every = 4
plateau_window = 3
probe_every = 1
probe_size = 2

[[train.phases]]
name = "COARSE"
min_steps = 3
max_steps = 4

[[train.phases]]
name = "FINE"
lr = 1e-6
alpha = 2
loss = "charbonnier"
optimizer = "adamp"
min_steps = 3
max_steps = 4

[verify]
seeds = 2
batch_size = 2
steps = 2

[[render]]
prompt = "portrait in a garden"
steps = 2
"""


FAST_TRAIN = FAST_JOB.split("[verify]")[0]  # its [prepare] and [train]: for jobs of other kinds that train


def write_png(path: Path, rgb: np.ndarray) -> Path:
    from engine.images import png_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))
    return path


def make_job(folder: Path, photos: dict[str, np.ndarray | bytes], job_toml: str = FAST_JOB) -> Path:
    """A job folder with `photos` (arrays become PNGs, bytes are written as they are) and job.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in photos.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            write_png(folder / name, content)
    (folder / "job.toml").write_text(job_toml, encoding="utf-8")
    return folder


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove inputs are untouched)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models folder for every test that runs daemon subprocesses (e2e, fuzz, faults): the tiny
    demo model is built into it once here, instead of by the first daemon of every test (~30 s each)."""
    models = tmp_path_factory.mktemp("models")
    if importlib.util.find_spec("engine.models") is not None:
        build = "import sys; from pathlib import Path; from engine.models import demo_model_dir, make_demo_model; make_demo_model(demo_model_dir(Path(sys.argv[1])))"
        subprocess.run([sys.executable, "-c", build, str(models)], cwd=REPO, check=True, capture_output=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    return models
