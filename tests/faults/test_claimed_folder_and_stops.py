"""A person writes into a job folder after the daemon claimed it; a daemon is told to stop in the
middle of rendering.

It was: a photo replaced mid-run showed in report.html as "the original" while the manifest
listed the old hash (and verify-audit passed); a file added mid-run was deleted with the claimed
folder, no copy anywhere; SIGTERM was not seen inside verify or render (every remaining render
pass ran after it: with real models that outlasts compose's stop grace and ends in SIGKILL)."""

from __future__ import annotations

import json
import signal
import time

from PIL import Image

from daemon.claim import find_claims
from engine.fsutil import sha256_bytes
from engine.images import png_bytes
from tests.harness.lab import FAST_JOB, drop_job, parse_ts, photo_bytes
from tests.harness.faults import check_evidence, drops_of

HEAVY_RENDER = FAST_JOB.replace('count = 1\nsteps = 2', 'count = 3\nsteps = 40')


def test_files_written_into_a_claimed_folder_are_kept_and_sigterm_stops_within_one_image(lab):
    from skimage import data

    marker = lab.root / "copied"
    lab.configure(scan_seconds=0.5, lease_seconds=4.0)
    daemon = lab.start(env={"ENGINE_PAUSE_AT": "job:inputs_copied", "ENGINE_PAUSE_MODE": "hold", "ENGINE_PAUSE_FILE": str(marker)})
    photo = photo_bytes()
    dropped = {"lena": drops_of(drop_job(lab.inbox, "lena", photos={"photo.png": photo}))}
    lab.wait_until(marker.exists, 60, "the job to have copied its inputs")

    [claim] = find_claims(lab.work)
    replacement = png_bytes(data.astronaut()[::-1])  # a person whose shell sat in the folder replaces the photo
    (claim.folder / "photo.png").write_bytes(replacement)
    (claim.folder / "notes.txt").write_text("photo flipped: the first was upside down\n")
    dropped["lena"] += [("photo.png", replacement), ("notes.txt", (claim.folder / "notes.txt").read_bytes())]
    marker.unlink()

    ended = daemon.wait_for("job_ended", 120, folder="lena")
    assert ended["outcome"] == "finished", ended
    changed = daemon.wait_for("claimed_folder_changed", 10)
    assert changed["added"] == ["notes.txt"] and changed["changed"] == ["photo.png"]
    places = check_evidence(lab, dropped)
    assert places == {"lena": ["failed", "outbox"]}
    [job_dir] = lab.finished_jobs()["lena"]
    assert (job_dir / "inputs" / "photo.png").read_bytes() == photo  # the job ran from the folder as claimed
    assert Image.open(job_dir / "report" / "original_0.png").text["sha256"] == sha256_bytes(photo)
    [kept] = list((lab.failed / "lena").iterdir())
    error = json.loads((kept / "error.json").read_text())
    assert error["code"] == "changed_after_claim" and error["details"]["ran_as"] == job_dir.name
    assert sorted(p.name for p in (kept / "inputs").iterdir()) == ["notes.txt", "photo.png"]  # what was written, not a second copy

    # SIGTERM while rendering: the job stops at the next denoising step, not after every pass.
    mark = daemon.mark()
    drop_job(lab.inbox, "max", job_toml=HEAVY_RENDER, photos={"photo.png": photo})
    lab.wait_until(marker.exists, 60, "the second job to have copied its inputs")
    marker.unlink()
    first = daemon.wait_for("stage_progress", 300, after=mark, stage="render")
    second = daemon.wait_for("stage_progress", 120, after=mark, stage="render", where=lambda e: e is not first and e["done"] > first["done"])
    one_image = parse_ts(second) - parse_ts(first)  # the scene pass of the first output
    asked = time.time()
    daemon.process.send_signal(signal.SIGTERM)
    stopped = daemon.wait_for("job_ended", 60, after=mark, folder="max")
    latency = parse_ts(stopped) - asked
    assert stopped["outcome"] == "interrupted"
    assert latency < one_image, f"the stop took {latency:.2f} s; one image takes {one_image:.2f} s"
    assert len(daemon.named("stage_progress", mark, stage="render")) <= 3  # of 7 render passes
    assert daemon.wait(60) == 0
    [claim] = find_claims(lab.work)  # kept, resumable, released for any daemon
    assert claim.claim.folder == "max" and claim.claim.released and not claim.claim.held
    check_evidence(lab, dropped)
