"""Fixtures of the end-to-end tests: a temporary installation (tests.harness.lab.Lab) whose daemons
are killed when the test ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.lab import Lab


@pytest.fixture()
def lab(tmp_path: Path, shared_models: Path):
    installation = Lab(tmp_path, shared_models)
    yield installation
    installation.stop_all()
