"""The restore kind end to end with the demo model's inpainting twin (issue 16): a cheek mask of
about a tenth of the face restores, with the photo's bytes outside the mask and the identity
scored; a mask over both eyes is refused into failed/ with its coverages and the input intact,
or, asked, answered with the classical fill alone."""

from __future__ import annotations

import json
import re
import time

import cv2
import numpy as np
import pytest

from engine.images import read_rgb
from engine.provenance.verification import verify_audit
from tests.harness.jobs import folder_snapshot, make_job, write_png

JOB = """\
kind = "restore"

[restore]
mask = "damage.png"
references = ["reference.png"]
seeds = [0, 1, 2]
steps = 10
"""


@pytest.fixture(scope="module")
def restore_engine(tmp_path_factory):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("restore")
    (root / "models").mkdir()
    return Engine(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)


def _job(tmp_path, astronaut_rgb, mask: np.ndarray, job: str = JOB):
    source = make_job(tmp_path / "inbox" / "alice", {"damaged.png": astronaut_rgb, "reference.png": np.ascontiguousarray(astronaut_rgb[:, ::-1])}, job)
    write_png(source / "damage.png", np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))
    return source


def test_a_cheek_mask_of_a_tenth_of_the_face_restores_with_the_identity_scored(tmp_path, restore_engine, astronaut_rgb):
    mask = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    mask[112:152, 179:204] = True  # her left cheek, beside the nose
    started = time.perf_counter()
    result = restore_engine.run_job(_job(tmp_path, astronaut_rgb, mask), tmp_path / "outbox")
    seconds = time.perf_counter() - started
    assert result.outcome == "finished", result.error
    assert seconds < 60
    out = result.output_dir
    assert verify_audit(out).ok
    info = json.loads((out / "restore" / "restore.json").read_text())
    assert info["photo"] == "damaged.png"  # neither the mask nor the reference was taken for the photo
    assert info["verdict"] == "ok" and 0.08 < info["coverage"]["face_coverage"] < 0.12, info["coverage"]
    assert info["damaged_drift_to_references"] is not None and info["seed_spread"] is not None
    assert len(info["variants"]) == 3 and all(row["drift_to_references"] is not None for row in info["variants"])
    assert all(0 <= row["identity2_distance"] < 2 for row in info["variants"])  # the second model's distance, beside
    coverage = json.loads((out / "restore" / "coverage.json").read_text())
    assert coverage["landmarks_from"].startswith("the TELEA pre-filled copy")
    # Outside the mask grown by grow_px (3 px) every byte is the photo's; inside, the model painted.
    grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))).astype(bool)
    for row in info["variants"]:
        variant = read_rgb(out / row["file"])
        assert np.array_equal(variant[~grown], astronaut_rgb[~grown]) and row["changed_outside_mask_px"] == 0
        assert not np.array_equal(variant[mask], astronaut_rgb[mask])
    page = (out / "report.html").read_text()
    assert "<h1>Restoration report: alice</h1>" in page and "seed spread" in page
    # before and after at full resolution, cut to the grown mask's box (plus margin) by the page
    assert info["mask_box"] == [179 - 3, 112 - 3, 204 + 3, 152 + 3]
    closeups = re.findall(r'data-kind="closeup" data-file="([^"]+)"><div class="crop" style="width:(\d+)px;height:(\d+)px">'
                          r'<img src="[^"]+" alt="[^"]+" style="margin:(-?\d+)px 0 0 (-?\d+)px">', page)
    best = min(info["variants"], key=lambda row: (row["drift_to_references"], row["seed"]))["file"]
    assert [c[0] for c in closeups] == ["inputs/damaged.png", best]
    assert all(c[1:] == ("79", "94", str(-(112 - 3 - 24)), str(-(179 - 3 - 24))) for c in closeups), closeups


def test_a_mask_over_both_eyes_is_refused_with_its_coverages_and_the_input_intact(tmp_path, restore_engine, astronaut_rgb):
    mask = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    mask[88:112, 185:268] = True  # a band across both eyes and brows
    source = _job(tmp_path, astronaut_rgb, mask)
    before = folder_snapshot(source)
    result = restore_engine.run_job(source, tmp_path / "outbox")
    assert result.outcome == "failed" and result.error["code"] == "restore_mask_too_large", result.error
    details = result.error["details"]["coverage"]
    assert details["feature_coverage"] > 0.2 and details["features"]["left_eye"] > 0.9 and details["features"]["right_eye"] > 0.9
    assert folder_snapshot(source) == before
    assert folder_snapshot(result.output_dir / "inputs") == before  # failed/ keeps the folder byte for byte
    error = json.loads((result.output_dir / "error.json").read_text())
    assert error["details"]["coverage"] == details


def test_refused_but_asked_for_the_classical_fill_delivers_it_labelled_non_generative(tmp_path, restore_engine, astronaut_rgb):
    mask = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    mask[88:112, 185:268] = True
    result = restore_engine.run_job(_job(tmp_path, astronaut_rgb, mask, JOB + 'on_refuse = "classical"\n'), tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    info = json.loads((result.output_dir / "restore" / "restore.json").read_text())
    assert info["verdict"] == "refused_classical" and info["generative"] is False and info["variants"] == []
    assert (result.output_dir / info["classical_fill"]).is_file()
    assert not any((result.output_dir / "restore" / "variants").iterdir())


def test_the_damage_painted_in_a_key_colour_into_a_copy_is_the_mask(tmp_path, restore_engine, astronaut_rgb):
    mask = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    mask[112:152, 179:204] = True
    painted = astronaut_rgb.copy()
    painted[mask] = (255, 0, 255)
    job = JOB.replace('mask = "damage.png"', 'painted = "painted.png"')
    source = _job(tmp_path, astronaut_rgb, mask, job)
    (source / "damage.png").unlink()
    write_png(source / "painted.png", painted)
    result = restore_engine.run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    info = json.loads((result.output_dir / "restore" / "restore.json").read_text())
    assert info["photo"] == "damaged.png" and info["mask_form"] == "painted in [255, 0, 255]"
    assert np.array_equal(read_rgb(result.output_dir / "restore" / "mask.png")[..., 0] > 0, mask)


def test_a_painted_copy_of_another_photo_is_refused_naming_it(tmp_path, astronaut_rgb):
    from engine.identity.coverage import keyed_mask
    from engine.errors import JobError

    other = np.ascontiguousarray(astronaut_rgb[::-1])
    other[100:120, 100:120] = (255, 0, 255)
    write_png(tmp_path / "painted.png", other)
    with pytest.raises(JobError, match=r"restore\.painted \(painted\.png\): .* of its unpainted pixels differ from the photo"):
        keyed_mask(tmp_path / "painted.png", astronaut_rgb, (255, 0, 255), 8, "restore.painted")
