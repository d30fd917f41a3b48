"""Job folders for tests: the fast job texts and the builders of a folder from photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


# A job that stops early cheaply (the fuzz tests run it `until="prepare"`): one 64 px prepared
# image per photo, no background removal.
PREPARE_JOB = """\
[prepare]
size = 64
rotations = []
crops = []
remove_background = false

[[render]]
prompt = "portrait in a garden"
"""
