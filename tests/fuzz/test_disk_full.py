"""A full disk while the engine writes a job's outputs: the disk is at fault, not the job, so the
job is *held* (`disk_full`, a message naming the file), resumable in the work area with nothing
lost, and no failed/ copy is made of a job that did nothing wrong; once space is freed the same
job resumes, and the engine goes on serving.

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
from engine.jobfolder import INPUTS_DIR, work_dir
from engine.runner import Engine
from tests.harness.jobs import PREPARE_JOB
from tests.harness.strategies import tree_snapshot


def _source(tmp_path: Path, face_rgb, name: str = "alice") -> Path:
    source = tmp_path / "inbox" / name
    source.mkdir(parents=True)
    (source / "a.png").write_bytes(png_bytes(face_rgb))
    (source / JOB_FILE).write_text(PREPARE_JOB, encoding="utf-8")
    return source


def _check_held(result, before: dict, source: Path, outbox: Path, file_named: str, resumable: bool = True) -> dict:
    """Held: disk_full naming the file, the job resumable in the work area with its verified copy
    of the inputs (or, when not even its ledger could be written, no work folder at all), the
    source untouched, nothing in failed/."""
    assert result.outcome == "held", result
    error = result.error
    assert error["code"] == "disk_full" and "No space left on device" in error["message"] and file_named in error["message"], error
    assert error["details"]["errno"] == errno.ENOSPC and "nothing was lost" in error["message"]
    assert tree_snapshot(source) == before
    kept = work_dir(outbox, result.job_id)
    if resumable:
        assert kept.is_dir() and tree_snapshot(kept / INPUTS_DIR) == before
    else:
        assert not kept.exists()
    assert not (outbox.parent / "failed").exists() or not any((outbox.parent / "failed").iterdir())
    return error


@pytest.mark.parametrize("pattern, file_named", [
    ("*/prepared/*.png", "prepared/0-a_base.png"),
    ("*/prepared/prepare.json", "prepared/prepare.json"),
    ("*/state.json", "state.json"),  # the ledger, the job's very first write: nothing to resume, nothing left behind
])
def test_enospc_on_an_output_holds_the_job_then_it_resumes(tmp_path, fuzz_engine, face_rgb, monkeypatch, pattern, file_named):
    source = _source(tmp_path, face_rgb)
    before = tree_snapshot(source)
    outbox = tmp_path / "outbox"
    monkeypatch.setenv("ENGINE_FAIL_WRITES", f"ENOSPC:{pattern}")
    result = fuzz_engine.run_job(source, outbox, until="prepare")
    resumable = file_named != "state.json"
    _check_held(result, before, source, outbox, file_named, resumable)
    if resumable:
        events = [json.loads(line)["event"] for line in (work_dir(outbox, result.job_id) / "audit.jsonl").read_text().splitlines()]
        assert events[-1] == "job_held" and "job_failed" not in events

    monkeypatch.delenv("ENGINE_FAIL_WRITES")
    again = fuzz_engine.run_job(source, outbox, until="prepare")
    assert again.outcome == "partial", again.error
    assert (again.job_id == result.job_id) == resumable  # the same job, resumed
    assert (again.output_dir / "prepared" / "prepare.json").is_file()


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
    is elsewhere. The job is held, not failed; freed space lets the same job go on."""
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
    _check_held(result, before, source, outbox, "prepared/")
    assert not failed.exists() or not any(failed.iterdir())

    filled[0].unlink()  # the lab frees some space: the job goes on where it stopped
    again = engine.run_job(source, outbox, until="prepare", failed_dir=failed)
    assert again.outcome == "partial", again.error
    assert again.job_id == result.job_id
