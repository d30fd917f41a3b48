"""The daemon (a real `python -m daemon` subprocess, tests.harness.lab) fed hostile
folders: links that leave the job folder, each refused into failed/ with error.json and its
inputs as dropped; and a job whose outputs hit a full disk (ENGINE_FAIL_WRITES, engine/faults.py),
which is the disk's fault, not the job's: it is held, claimed and intact, never failed. The daemon
keeps serving, and a good job dropped afterwards finishes. (Real full and read-only disks:
tests/faults/.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.claim import find_claims
from engine.fsutil import sha256_bytes
from engine.jobfolder import INPUTS_DIR
from engine.provenance.verification import verify_audit
from tests.harness.lab import FAST_JOB, Lab, photo_bytes
from tests.harness.strategies import tree_snapshot


@pytest.fixture()
def lab(tmp_path: Path, fuzz_models: Path):
    installation = Lab(tmp_path, fuzz_models)
    yield installation
    installation.stop_all()


def _drop(lab: Lab, name: str, make) -> dict:
    """Build the folder beside the inbox, snapshot it, then rename it in (as a careful lab does)."""
    staging = lab.root / "staging" / name
    staging.mkdir(parents=True)
    make(staging)
    (staging / "READY").write_bytes(b"")
    snapshot = tree_snapshot(staging)
    staging.rename(lab.inbox / name)
    return snapshot


def test_daemon_refuses_links_and_survives_a_full_disk(lab, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "photos").mkdir(parents=True)
    photo = photo_bytes()
    (outside / "photos" / "face.png").write_bytes(photo)
    (outside / "job.toml").write_text(FAST_JOB, encoding="utf-8")
    outside_before = tree_snapshot(outside)
    lab.inbox.mkdir(parents=True, exist_ok=True)
    lab.configure(hold_retry_seconds=0.5)
    daemon = lab.start(env={"ENGINE_FAIL_WRITES": "ENOSPC:*/prepared/0-full_*"})

    def photo_links_out(folder: Path) -> None:
        (folder / "job.toml").write_text(FAST_JOB)
        (folder / "photo.png").symlink_to(outside / "photos" / "face.png")  # absolute: the claim moves the folder

    def job_links_out(folder: Path) -> None:
        (folder / "job.toml").symlink_to(outside / "job.toml")
        (folder / "photo.png").write_bytes(photo)

    def subfolder_links_out(folder: Path) -> None:
        (folder / "job.toml").write_text(FAST_JOB.replace("[prepare]", '[subject]\nphotos = ["photos/face.png"]\n\n[prepare]'))
        (folder / "photos").symlink_to(outside / "photos")

    def passwd(folder: Path) -> None:
        (folder / "job.toml").write_text(FAST_JOB)
        (folder / "photo.png").write_bytes(photo)
        (folder / "notes.txt").symlink_to("/etc/passwd")

    def disk_full(folder: Path) -> None:
        (folder / "job.toml").write_text(FAST_JOB)
        (folder / "full.png").write_bytes(photo)

    def good(folder: Path) -> None:
        (folder / "job.toml").write_text(FAST_JOB)
        (folder / "photo.png").write_bytes(photo)

    expected = {  # folder -> (code, a name error.json must quote)
        "photolink": ("invalid_job", "photo.png"), "joblink": ("invalid_job", "job.toml"),
        "dirlink": ("invalid_job", "photos"), "passwd": ("invalid_job", "notes.txt"),
    }
    makers = {"photolink": photo_links_out, "joblink": job_links_out, "dirlink": subfolder_links_out, "passwd": passwd}
    dropped = {name: _drop(lab, name, make) for name, make in makers.items()}
    for name in dropped:
        ended = daemon.wait_for("job_ended", 90, folder=name)
        assert ended["outcome"] == "failed" and ended["code"] == expected[name][0], ended

    for name, snapshot in dropped.items():
        code, quoted = expected[name]
        [failed_dir] = list((lab.failed / name).iterdir())
        error = json.loads((failed_dir / "error.json").read_text(encoding="utf-8"))
        assert error["code"] == code and error["job_id"] == failed_dir.name
        assert quoted in error["message"] or any(quoted in p["where"] for p in error["problems"]), error
        assert tree_snapshot(failed_dir / INPUTS_DIR) == snapshot, f"{name}: the failed/ copy is not the folder as dropped"
        assert verify_audit(failed_dir).ok and verify_audit(failed_dir).verdict == "failed"
        assert not (lab.inbox / name).exists()
    assert tree_snapshot(outside) == outside_before
    assert find_claims(lab.work) == []

    # The disk fills under a job: held (twice at least: its retries back off), never failed, never lost.
    full = _drop(lab, "diskfull", disk_full)
    held = daemon.wait_for("job_ended", 90, folder="diskfull", outcome="held")
    assert held["code"] == "disk_full"
    daemon.wait_for("job_ended", 90, where=lambda e: e.get("folder") == "diskfull" and e is not held and e.get("outcome") == "held")
    [claim] = find_claims(lab.work)
    assert claim.claim.held.startswith("disk_full: ") and "No space left on device" in claim.claim.held and claim.claim.crashes == 0
    assert tree_snapshot(claim.folder) == full and not (lab.failed / "diskfull").exists()

    _drop(lab, "good", good)  # the same kind of folder, but not under the full "disk"
    ended = daemon.wait_for("job_ended", 180, folder="good")
    assert ended["outcome"] == "finished", ended
    [job_dir] = lab.finished_jobs()["good"]
    assert verify_audit(job_dir).ok
    assert json.loads((job_dir / "manifest.json").read_text())["inputs"]["photo.png"] == sha256_bytes(photo)
    assert daemon.process.poll() is None, "the daemon died"
    metrics = daemon.metrics()
    assert metrics['idrep_jobs_total{outcome="held"}'] >= 2 and metrics['idrep_jobs_total{outcome="crashed"}'] == 0
    assert metrics['idrep_job_holds_total{code="disk_full"}'] >= 2 and metrics["idrep_ready"] == 1
    assert daemon.terminate() == 0
