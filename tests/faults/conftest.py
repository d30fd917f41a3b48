"""Fixtures of the fault suite: a temporary installation (tests.harness.lab.Lab) whose daemons are
killed and whose mounts are undone when the test ends (tests.harness.faults has the faults)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.faults import unmount_all
from tests.harness.lab import Lab


@pytest.fixture()
def lab(tmp_path: Path, shared_models: Path) -> Iterator[Lab]:
    installation = Lab(tmp_path, shared_models)
    yield installation
    installation.stop_all()
    unmount_all(tmp_path)
