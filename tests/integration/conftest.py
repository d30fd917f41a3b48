"""Fixtures several integration modules share: one clean run of the two-photo demo job serves
every module that compares a resumed job with it (test_resume, test_hostile_resume); a lab's
signing keys for each module that signs (test_trust, test_signer)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def clean_two_photo_run(tmp_path_factory, astronaut_rgb) -> Path:
    """The two-photo job (tests.harness.resume.make_two_photo_job) run once without
    interruption, in a process of its own, as job JOB_ID: its published folder. A job's outputs
    do not depend on where its folders are, so any module's copy of the job compares with it."""
    from tests.harness.resume import JOB_ID, engine_cli, make_two_photo_job

    root = tmp_path_factory.mktemp("clean")
    source, config = make_two_photo_job(root, astronaut_rgb)
    process = engine_cli(config, source, root / "outbox", job_id=JOB_ID)
    assert process.wait(timeout=300) == 0, process.communicate()
    return root / "outbox" / "alice" / JOB_ID


@pytest.fixture(scope="module")
def lab_keys(tmp_path_factory) -> Path:
    """A lab's keys ("Test Lab": its content signer is "Test Lab content signer"), one set per module."""
    from engine.provenance.trust import make_lab_keys

    folder = tmp_path_factory.mktemp("lab") / "keys"
    make_lab_keys(folder, "Test Lab")
    return folder
