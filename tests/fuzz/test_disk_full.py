"""A full disk while the engine writes a job's outputs: the job fails cleanly (`disk_full`,
error.json naming the file, the inputs untouched in failed/), and the engine goes on serving.

Two ways to fill the disk: ENGINE_FAIL_WRITES (engine/faults.py) makes chosen atomic writes
raise ENOSPC, and, where this process may mount file systems (root in a VM or container with
CAP_SYS_ADMIN), a real 2 MB tmpfs filled to the last byte. The daemon's side (a next job
completes) is in test_daemon_hostile.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from engine.images import png_bytes
from engine.job import JOB_FILE
from engine.runner import WORK_DIR, Engine
from tests.fuzz.conftest import PREPARE_JOB
from tests.fuzz.strategies import check_failed_copy, tree_snapshot


def _source(tmp_path: Path, face_rgb, name: str = "alice") -> Path:
    source = tmp_path / "inbox" / name
    source.mkdir(parents=True)
    (source / "a.png").write_bytes(png_bytes(face_rgb))
    (source / JOB_FILE).write_text(PREPARE_JOB, encoding="utf-8")
    return source


@pytest.mark.parametrize("pattern, file_named", [
    ("*/prepared/*.png", "prepared/0-a_base.png"),
    ("*/prepared/prepare.json", "prepared/prepare.json"),
    ("*/state.json", "state.json"),  # the ledger: also rewritten while failing, which must not matter
])
def test_enospc_on_an_output_fails_the_job_cleanly_then_the_engine_goes_on(tmp_path, fuzz_engine, face_rgb, monkeypatch, pattern, file_named):
    source = _source(tmp_path, face_rgb)
    before = tree_snapshot(source)
    outbox = tmp_path / "outbox"
    monkeypatch.setenv("ENGINE_FAIL_WRITES", f"ENOSPC:{pattern}")
    result = fuzz_engine.run_job(source, outbox, until="prepare")
    error = check_failed_copy(result, before, {"disk_full"}, (file_named,))
    assert "No space left on device" in error["message"] and error["details"]["errno"] == errno.ENOSPC
    assert tree_snapshot(source) == before
    assert not (outbox / WORK_DIR / "alice" / result.job_id).exists(), "the failed job's work folder was left behind"
    events = [json.loads(line)["event"] for line in (result.output_dir / "audit.jsonl").read_text().splitlines()]
    assert events[0] == "job_started" and events[-1] == "job_failed"

    monkeypatch.delenv("ENGINE_FAIL_WRITES")
    again = fuzz_engine.run_job(source, outbox, until="prepare")
    assert again.outcome == "partial", again.error
    assert again.job_id != result.job_id and (again.output_dir / "prepared" / "prepare.json").is_file()


def test_fault_injection_is_inert_when_unset_and_exact_when_set(tmp_path, monkeypatch):
    from engine.fsutil import atomic_write_bytes

    monkeypatch.delenv("ENGINE_FAIL_WRITES", raising=False)
    atomic_write_bytes(tmp_path / "a" / "x.png", b"1")
    monkeypatch.setenv("ENGINE_FAIL_WRITES", "EDQUOT:*/b/*")
    atomic_write_bytes(tmp_path / "a" / "y.png", b"2")
    with pytest.raises(OSError) as excinfo:
        atomic_write_bytes(tmp_path / "b" / "x.png", b"3")
    assert excinfo.value.errno == errno.EDQUOT and excinfo.value.filename == str(tmp_path / "b" / "x.png")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [], "a failed atomic write left its temporary file"
    assert (tmp_path / "a" / "x.png").read_bytes() == b"1" and (tmp_path / "a" / "y.png").read_bytes() == b"2"


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs, or a skip where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(folder: Path) -> Path:
    """Write one file until the file system has no byte left."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                handle.write(b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_real_full_disk_under_the_outbox(tmp_path, fuzz_engine, face_rgb, small_disk):
    """The outbox (and so the work area) is on a disk that fills up as prepare starts; failed/
    is elsewhere. Even the audit's last line cannot be written: the failure is still published."""
    source = _source(tmp_path, face_rgb)
    before = tree_snapshot(source)
    outbox, failed = small_disk / "outbox", tmp_path / "failed"
    filled: list[Path] = []

    def fill_when_prepare_starts(event: str, fields: dict) -> None:
        if event == "stage_started" and fields.get("stage") == "prepare" and not filled:
            filled.append(_fill(small_disk))

    engine = Engine(fuzz_engine.settings, demo=True, observer=fill_when_prepare_starts)
    result = engine.run_job(source, outbox, until="prepare", failed_dir=failed)
    assert filled, "prepare never started"
    error = check_failed_copy(result, before, {"disk_full"}, ("prepared/0-a_base.png",))
    assert result.output_dir.parent.parent == failed
    # The audit's last line fits in the slack of its last page, or is reported as missing.
    last_event = json.loads((result.output_dir / "audit.jsonl").read_text().splitlines()[-1])["event"]
    assert last_event == "job_failed" or "audit_incomplete" in error["details"]
    assert tree_snapshot(source) == before
    assert not (outbox / WORK_DIR / "alice" / result.job_id).exists()

    filled[0].unlink()  # the lab frees some space: the next job goes through
    again = engine.run_job(source, outbox, until="prepare", failed_dir=failed)
    assert again.outcome == "partial", again.error
