"""`python -m daemon status`: the shared folders read as a person wants them: what waits (ready
or still copying), who holds which claim and whether its lease is alive, how far each claimed
job is, and the last results. Real folders, real claim files; no daemon runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from daemon.__main__ import main
from daemon.claim import Owner, claim_folder, release
from daemon.status import daemon_status, format_daemon_status
from engine.jobfolder import AUDIT_FILE, LEDGER_FILE, work_dir

STABLE = 10.0


def _folder(root: Path, name: str, files: dict[str, str], age_seconds: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for file, text in files.items():
        (folder / file).write_text(text)
    when = time.time() - age_seconds
    for path in (folder, *folder.iterdir()):
        os.utime(path, (when, when))
    return folder


def _layout(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("inbox", "work", "outbox", "failed")}
    for path in paths.values():
        path.mkdir()
    inbox = paths["inbox"]
    _folder(inbox, "marked", {"job.toml": "", "READY": ""}, age_seconds=0)
    _folder(inbox, "settled", {"job.toml": "", "a.jpg": "x"}, age_seconds=60)
    _folder(inbox, "copying", {"job.toml": "", "a.jpg": "x"}, age_seconds=1)
    _folder(inbox, "no-job", {"a.jpg": "x"}, age_seconds=60)
    _folder(inbox, ".hidden", {"job.toml": ""}, age_seconds=60)
    _folder(inbox, "eve.part", {"job.toml": ""}, age_seconds=60)  # a copy tool's name: never a job, but listed
    # A live claim whose job the engine is training, and a claim of a dead daemon.
    live = claim_folder(_folder(inbox, "alice", {"job.toml": ""}, 60), paths["work"], "J1", Owner("gpu-0", "host-a", 11), lease_seconds=600)
    dead = claim_folder(_folder(inbox, "bob", {"job.toml": ""}, 60), paths["work"], "J2", Owner("gpu-1", "host-b", 22), lease_seconds=0.5)
    held = claim_folder(_folder(inbox, "dave", {"job.toml": ""}, 60), paths["work"], "J3", Owner("gpu-1", "host-b", 22), lease_seconds=60)
    assert live and dead and held
    assert release(held, held="disk_full: No space left on device (/outbox/.work/J3/prepared)", retry_seconds=300)
    job_dir = work_dir(paths["outbox"], "J1")
    job_dir.mkdir(parents=True)
    (job_dir / LEDGER_FILE).write_text(json.dumps({"job_id": "J1", "subject": "alice", "outcome": "running", "stages": [
        {"name": "prepare", "status": "complete"}, {"name": "embed", "status": "complete"}, {"name": "train", "status": "running"}]}))
    (job_dir / AUDIT_FILE).write_text(json.dumps({"event": "phase_started", "phase": "MID", "step": 120, "ts": "2026-11-26T00:00:00+00:00"}) + "\n")
    failed = paths["failed"] / "carol" / "J0"
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"code": "no_face_found", "message": "no face in a.jpg", "failed_at": "2026-11-25T10:00:00+00:00"}))
    return paths


def test_status_reads_queue_claims_progress_and_results(tmp_path):
    paths = _layout(tmp_path)
    status = daemon_status(paths["inbox"], paths["work"], paths["outbox"], paths["failed"], stable_seconds=STABLE, now=time.time() + 1)
    waiting = {w.folder: (w.ready, w.why) for w in status.waiting}
    assert waiting == {"marked": (True, "READY file"), "settled": (True, waiting["settled"][1]), "copying": (False, waiting["copying"][1]),
                       "no-job": (False, waiting["no-job"][1])}
    assert waiting["no-job"][1].startswith("waiting for job.toml: unchanged for 6")  # older than stable_seconds: not a copy in progress
    assert waiting["settled"][1].startswith("unchanged for 6") and "ready after 10 s unchanged" in waiting["copying"][1]
    claims = {c.job_id: c for c in status.claims}
    assert claims["J1"].daemon_id == "gpu-0" and claims["J1"].lease == "live" and claims["J1"].folder == "alice"
    assert claims["J1"].progress is not None and claims["J1"].progress.stage == "train"
    assert claims["J2"].lease == "expired" and claims["J2"].lease_seconds_left < 0 and claims["J2"].progress is None
    assert claims["J3"].lease == "held" and claims["J3"].held.startswith("disk_full") and 290 < claims["J3"].lease_seconds_left <= 300
    assert status.ignored == [("eve.part", "temporary name (.part/.tmp/~): taken for a copy in progress, never for a job; rename it to start it")]
    text = format_daemon_status(status)
    assert "5 folder(s)" not in text  # hidden folders are not jobs
    assert "4 folder(s), 2 ready, 1 still copying, 1 waiting for job.toml" in text
    assert "  waiting  no-job  (waiting for job.toml" in text
    assert "alice  J1  held by gpu-0 (host host-a, pid 11); lease live" in text
    assert "stage train (3/5), running: training: phase MID since step 120" in text
    assert "bob  J2  held by gpu-1 (host host-b, pid 22); LEASE EXPIRED" in text and "takes it over" in text
    assert "carol  J0  FAILED  no_face_found: no face in a.jpg" in text
    assert "dave  J3  held by gpu-1 (host host-b, pid 22); held: disk_full: No space left on device" in text and "retried in 29" in text
    assert "ignored  eve.part  (temporary name" in text


def test_the_cli_reads_the_folders_of_the_config(tmp_path, capsys):
    paths = _layout(tmp_path)
    config = tmp_path / "lab.toml"
    config.write_text('[daemon]\ninbox = "inbox"\noutbox = "outbox"\nstable_seconds = 10\n')
    assert main(["status", "--config", str(config)]) == 0
    assert "held by gpu-0" in capsys.readouterr().out
    assert main(["status", "--config", str(config), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert [c["job_id"] for c in plain["claims"]] == ["J1", "J2", "J3"] and plain["claims"][0]["progress"]["stage"] == "train"
    assert plain["results"][0]["error"].startswith("no_face_found")
    assert main(["status", "--config", str(config), "--inbox", str(tmp_path / "elsewhere")]) == 0
    assert "elsewhere: 0 folder(s)" in capsys.readouterr().out
