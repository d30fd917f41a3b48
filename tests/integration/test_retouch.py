"""The retouch kind end to end with the demo model's 9-channel inpainting twin (issue 15): the
original's bytes outside every mask, the same variant from the same seed and strength, a kill
mid-sweep that resumes without redoing finished variants, refusals that name their key."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import JobError
from engine.images import read_rgb
from engine.job import load_job
from engine.jobfolder import work_dir
from engine.provenance.verification import verify_audit
from tests.harness.jobs import make_job, write_png
from tests.harness.paths import REPO

JOB = """\
kind = "retouch"

[prepare]
size = 128
rotations = []
crops = []

[retouch]
strengths = [0.18, 0.26]
seeds = [0, 1]
steps = 20
"""
JOB_ID = "20260101T000000Z-retouch"


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / "retouch" / "retouch.json").read_text())["variants"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("retouch")
    (root / "models").mkdir()
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    source = make_job(root / "inbox" / "alice", {"a.png": astronaut_rgb}, JOB)
    started = time.perf_counter()
    result = Engine(settings, demo=True).run_job(source, root / "outbox", job_id=JOB_ID)
    seconds = time.perf_counter() - started
    assert result.outcome == "finished", result.error
    print(f"demo retouch job: {seconds:.1f} s")
    return root, result.output_dir, seconds


def test_a_demo_retouch_job_runs_end_to_end_with_its_report(finished):
    root, out, seconds = finished
    assert seconds < 60
    assert verify_audit(out).ok
    info = json.loads((out / "retouch" / "retouch.json").read_text())
    regions = {r["region"]: r for r in info["regions"]}
    assert not regions["forehead"]["applicable"] and "hair" in regions["forehead"]["reason"]  # her fringe
    assert info["region_sets"] == ["under_eye", "smile_lines", "chin", "under_eye+smile_lines+chin"]
    assert len(info["variants"]) == 4 * 2 * 2 and info["demo"] is True
    assert all(not row["accepted"] and row["reasons"] for row in info["variants"])  # demo noise is caught, never accepted
    # The second identity model's distance beside ArcFace's drift, reported only.
    assert info["identity2"]["available"] and info["identity2"]["used_for_acceptance"] is False
    assert all(0 <= row["identity2_distance"] < 2 for row in info["variants"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "retouch" and any(name.startswith("inpaint/unet/") for name in manifest["models"])
    assert any(name.startswith("landmarks/") for name in manifest["models"])
    page = (out / "report.html").read_text()
    assert "<h1>Retouch report: alice</h1>" in page and 'id="retouch-masks"' in page and 'id="variants"' in page
    assert all(f"retouch/grids/{name}.png" in page for name in info["region_sets"])
    # before/after at full resolution: each region of each set, the photo as dropped beside the
    # variant, cut to the region's recorded box (plus margin) by the page, never resampled
    closeups = re.findall(r'<figure class="closeup" data-kind="closeup" data-file="([^"]+)"><div class="crop" style="width:(\d+)px;height:(\d+)px">'
                          r'<img src="[^"]+" alt="[^"]+" style="margin:(-?\d+)px 0 0 (-?\d+)px">', page)
    regions_shown = sum(len(name.split("+")) for name in info["region_sets"])
    assert len(closeups) == 2 * regions_shown
    assert {file for file, *_ in closeups[::2]} == {"inputs/a.png"}
    x0, y0, x1, y1 = regions["under_eye"]["bbox"]
    width, height, top, left = map(int, closeups[0][1:])
    assert (-left, -top) == (max(0, x0 - 24), max(0, y0 - 24)) and width >= x1 - x0 and height >= y1 - y0
    assert not (out / "retouch_progress").exists()


def test_every_variant_keeps_the_originals_bytes_outside_its_masks_at_native_resolution(finished, astronaut_rgb):
    _, out, _ = finished
    alphas = {region: read_rgb(out / "retouch" / "masks" / f"{region}_alpha.png")[..., 0] for region in ("under_eye", "smile_lines", "chin")}
    for row in _rows(out):
        variant = read_rgb(out / row["file"])
        assert variant.shape == astronaut_rgb.shape
        support = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
        for region in row["region_set"]:
            support |= alphas[region] > 0
        assert np.array_equal(variant[~support], astronaut_rgb[~support]), row["file"]
        assert not np.array_equal(variant[support], astronaut_rgb[support])  # and it did change inside
        assert row["changed_outside_mask_px"] == 0


def test_the_same_seed_and_strength_give_the_same_variant(finished, tmp_path, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root, out, _ = finished
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    again = Engine(settings, demo=True).run_job(make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, JOB), tmp_path / "outbox")
    assert again.outcome == "finished", again.error
    for first, second in zip(_rows(out), _rows(again.output_dir)):
        assert (first["region_set"], first["strength"], first["seed"]) == (second["region_set"], second["strength"], second["seed"])
        assert np.array_equal(read_rgb(out / first["file"]), read_rgb(again.output_dir / second["file"]))
    seeds = [read_rgb(out / row["file"]) for row in _rows(out)[:2]]  # seeds 0 and 1 of the first set differ
    assert not np.array_equal(*seeds)


def test_a_sweep_killed_midway_resumes_without_redoing_finished_variants(finished, tmp_path, astronaut_rgb):
    root, out, _ = finished
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{root / "models"}"\n')
    source = make_job(tmp_path / "inbox" / "alice", {"a.png": astronaut_rgb}, JOB)
    outbox = tmp_path / "outbox"
    marker = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_PAUSE_AT="retouch:variant:5", ENGINE_PAUSE_FILE=str(marker))
    command = [sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox", str(outbox), "--demo", "--job-id", JOB_ID]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "never reached the fifth variant"
            time.sleep(0.05)
        assert len(list((work_dir(outbox, JOB_ID) / "retouch_progress").glob("*.json"))) == 5
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    rerun = subprocess.run([c for c in command], env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = Path(json.loads(rerun.stdout.strip().splitlines()[-1])["output"])
    events = [json.loads(line) for line in (final / "audit.jsonl").read_text().splitlines()]
    [swept] = [e for e in events if e["event"] == "retouch_swept"]
    # The first two batches (region set x strength, both seeds) are read back; the third, killed
    # half-way, is redone whole (CPU kernels depend on the batch size).
    assert swept["resumed_variants"] == 4 and swept["variants"] == 16
    for first, resumed in zip(_rows(out), _rows(final)):  # as an uninterrupted run made them
        assert np.array_equal(read_rgb(out / first["file"]), read_rgb(final / resumed["file"]))
    assert verify_audit(final).ok


def _refusal(tmp_path: Path, astronaut_rgb, job: str, files: dict | None = None) -> dict[str, str]:
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, **(files or {})}, job)
    with pytest.raises(JobError) as excinfo:
        load_job(folder, {}, (".png", ".jpg"), ())
    return {p.where: p.reason for p in excinfo.value.problems}


def test_a_capped_or_duplicate_strength_is_refused_naming_the_key(tmp_path, astronaut_rgb):
    problems = _refusal(tmp_path, astronaut_rgb, 'kind = "retouch"\n[retouch]\nstrengths = [0.2, 0.21, 0.3, 0.01]\nsteps = 30\n')
    assert problems["job.toml: retouch.strengths[1]"].startswith("0.21 denoises the same 6 steps as retouch.strengths[0] = 0.2")
    assert problems["job.toml: retouch.strengths[2]"].startswith("0.3 is above the cap of under_eye (retouch.caps.under_eye = 0.28)")
    assert "denoises no step" in problems["job.toml: retouch.strengths[3]"]


def test_a_retouch_job_takes_one_photo_and_never_takes_its_mask_for_one(tmp_path, astronaut_rgb):
    mask = np.zeros_like(astronaut_rgb)
    write_png(tmp_path / "mask.png", mask)
    job = make_job(tmp_path / "bob", {"a.png": astronaut_rgb, "forehead.png": (tmp_path / "mask.png").read_bytes()},
                   'kind = "retouch"\n[retouch]\nmasks = { forehead = "forehead.png" }\n')
    loaded = load_job(job, {}, (".png",), ())
    assert loaded.spec.subject.photos == ("a.png",)
    problems = _refusal(tmp_path, astronaut_rgb, 'kind = "retouch"\n', {"b.png": astronaut_rgb})
    assert problems["job.toml: subject.photos"].startswith("2 photos found; a retouch job takes one image")


def test_sequential_compositing_and_a_mask_of_ones_own(tmp_path, finished, astronaut_rgb):
    """[retouch.masks] replaces a region's mask (protected features still cut out); sequential
    compositing chains the regions; outside the masks every byte is the original's."""
    from engine.config import Settings
    from engine.runner import Engine

    root, _, _ = finished
    chin = np.zeros_like(astronaut_rgb)
    chin[150:175, 195:250] = 255  # a band across her chin and lower lip: the lip is protected
    job = JOB.replace("strengths = [0.18, 0.26]\nseeds = [0, 1]", 'regions = ["under_eye", "chin"]\nstrengths = [0.2]\nseeds = [0]\n'
                      'compositing = "sequential"\nmasks = { chin = "chin_mask.png" }')
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, job)
    write_png(source / "chin_mask.png", chin)
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    result = Engine(settings, demo=True).run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    out = result.output_dir
    info = json.loads((out / "retouch" / "retouch.json").read_text())
    assert info["compositing"] == "sequential" and info["region_sets"] == ["under_eye", "chin", "under_eye+chin"]
    mask = read_rgb(out / "retouch" / "masks" / "chin_mask.png")[..., 0] > 0
    assert mask.sum() < (chin[..., 0] > 0).sum() and not (mask & ~(chin[..., 0] > 0)).any()  # the band, less the lip
    support = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    for region in ("under_eye", "chin"):
        support |= read_rgb(out / "retouch" / "masks" / f"{region}_alpha.png")[..., 0] > 0
    [combined] = [row for row in info["variants"] if row["region_set"] == ["under_eye", "chin"]]
    variant = read_rgb(out / combined["file"])
    assert np.array_equal(variant[~support], astronaut_rgb[~support]) and combined["changed_outside_mask_px"] == 0
