"""An example subject built from a real photo that a package ships (nothing third-party is
committed): scikit-image's astronaut, one face."""

from __future__ import annotations

from pathlib import Path

from engine.fsutil import atomic_write_bytes, atomic_write_text
from engine.images import png_bytes
from engine.job import JOB_FILE

EXAMPLE_JOB = """\
# An example job: the photo is scikit-image's astronaut (public domain, NASA).
# Sized to run the whole chain on a 2-core CPU with the demo model in about a minute;
# a real job keeps the defaults of config.toml (768 px, 1200 steps, 16 seeds, 30 steps).
[subject]
name = "astronaut"

[prepare]
size = 256
rotations = [-10, 10]
crops = [0.8]

[train]
max_steps = 300

[verify]
seeds = 8
steps = 20

[[render]]
prompt = "portrait in a spa garden at dusk, candle-lit, 85mm, f/2.8"
mode = "three_pass"
count = 1
steps = 20

[[render]]
prompt = "portrait on a rainy city street at night, 50mm"
mode = "two_pass"
count = 1
steps = 20
"""


def write_example_subject(folder: Path) -> Path:
    """Write `folder`/astronaut.png and job.toml (overwriting nothing else)."""
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "astronaut.png", png_bytes(data.astronaut()))
    atomic_write_text(folder / JOB_FILE, EXAMPLE_JOB)
    return folder
