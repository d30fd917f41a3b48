"""Where the repository is: the cwd and PYTHONPATH of every subprocess a test starts."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
