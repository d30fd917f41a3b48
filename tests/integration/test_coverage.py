"""Damage coverage (issue 16): the maths on masks made from the face's own regions, the verdicts at
the limits' very edges, the mask files that are refused, and landmarks found through a TELEA
pre-fill on a real photo with a synthetic occlusion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.identity.coverage import CoverageLimits, coverage, face_region, feature_masks, load_mask, prefill
from engine.errors import JobError
from engine.identity.landmarks import LandmarkModels
from tests.harness.jobs import write_png


@pytest.fixture(scope="module")
def astronaut_marks(face_models, astronaut_rgb):
    models = LandmarkModels(["CPUExecutionProvider"], threads=1)
    return models, models.find(astronaut_rgb, max(face_models.detect(astronaut_rgb), key=lambda f: f.area))


def test_a_mask_equal_to_a_feature_covers_it_whole_and_nothing_else_of_the_features(astronaut_rgb, astronaut_marks):
    _, marks = astronaut_marks
    features = feature_masks(marks, astronaut_rgb.shape[:2])
    found = coverage(features["mouth"], marks)
    assert found.features["mouth"] == 1.0
    assert found.features["left_eye"] == found.features["right_eye"] == 0.0
    assert 0 < found.feature < 1 and 0 < found.face < found.feature  # the mouth is part of the face, a larger region
    assert coverage(face_region(marks, astronaut_rgb.shape[:2]), marks).face == 1.0


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(-3, 3), limit=st.sampled_from(["flag_face", "refuse_face"]))
def test_face_coverage_verdicts_at_the_limits_edges(astronaut_rgb, astronaut_marks, offset, limit):
    """Masks of exactly n face pixels (none of a feature) around 15 % and 25 %: a coverage above the
    limit crosses it, one at or below does not."""
    _, marks = astronaut_marks
    shape = astronaut_rgb.shape[:2]
    face = face_region(marks, shape)
    features = np.zeros(shape, dtype=bool)
    for region in feature_masks(marks, shape).values():
        features |= region
    skin = np.flatnonzero(face & ~features)
    limits = CoverageLimits()
    share = getattr(limits, limit)
    count = int(np.floor(share * face.sum())) + offset
    mask = np.zeros(shape, dtype=bool)
    mask.flat[skin[:count]] = True
    found = coverage(mask, marks)
    assert found.face == count / face.sum() and found.feature == 0.0
    verdict, reasons = found.verdict(limits)
    crossed = found.face > share
    if limit == "flag_face":
        assert verdict == ("flag" if crossed else "ok"), (found.face, reasons)
    else:
        assert verdict == ("refuse" if crossed else "flag"), (found.face, reasons)


def test_a_feature_more_than_half_masked_is_flagged(astronaut_rgb, astronaut_marks):
    _, marks = astronaut_marks
    nose = feature_masks(marks, astronaut_rgb.shape[:2])["nose"]
    half = np.zeros_like(nose)
    rows = np.flatnonzero(nose.any(axis=1))
    half[rows[0]: rows[0] + int(len(rows) * 0.7)] = True
    verdict, reasons = coverage(nose & half, marks).verdict(CoverageLimits(flag_feature=1.0, flag_face=1.0, refuse_face=1.0, refuse_feature=1.0))
    assert verdict == "flag" and any(reason.startswith("the nose is") for reason in reasons)


def test_landmarks_are_found_through_a_telea_prefill_and_both_eyes_masked_is_refused(face_models, astronaut_rgb, astronaut_marks):
    models, marks = astronaut_marks
    shape = astronaut_rgb.shape[:2]
    features = feature_masks(marks, shape)
    eyes = np.zeros(shape, dtype=bool)
    for name in ("left_eye", "right_eye", "left_brow", "right_brow"):
        eyes |= features[name]
    eyes = cv2.dilate(eyes.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    damaged = astronaut_rgb.copy()
    damaged[eyes] = 0  # a black band over both eyes
    filled = prefill(damaged, eyes)
    assert np.array_equal(filled[~eyes], damaged[~eyes]) and filled[eyes].mean() > 40  # filled from around, not left black
    face = max(face_models.detect(filled), key=lambda f: f.area)
    through = models.find(filled, face)
    assert np.linalg.norm(through.points - marks.points, axis=1).mean() / marks.iod < 0.1  # close to the undamaged photo's
    found = coverage(eyes, through)
    verdict, reasons = found.verdict(CoverageLimits())
    assert verdict == "refuse" and found.features["left_eye"] == found.features["right_eye"] == 1.0, found.facts()
    cheek = np.zeros(shape, dtype=bool)
    cheek[125:145, 185:200] = True  # on her cheek: well under the limits
    assert coverage(cheek, marks).verdict(CoverageLimits())[0] == "ok"


@pytest.mark.parametrize("content, reason", [
    ("jpeg", "is a JPEG; a mask must be a lossless PNG"),
    ("size", "is 100x80 px and the photo 512x512"),
    ("empty", "marks no pixel as damaged"),
    ("full", "marks the whole photo as damaged"),
    ("text", "is not a PNG"),
])
def test_a_mask_that_cannot_be_one_is_refused_naming_the_file(tmp_path, content, reason):
    from PIL import Image

    path = tmp_path / "damage.png"
    if content == "jpeg":
        Image.fromarray(np.full((512, 512), 255, np.uint8)).save(path, format="JPEG")
    elif content == "size":
        write_png(path, np.full((80, 100, 3), 255, np.uint8))
    elif content in ("empty", "full"):
        write_png(path, np.full((512, 512, 3), 0 if content == "empty" else 255, np.uint8))
    else:
        path.write_text("not an image")
    with pytest.raises(JobError) as refused:
        load_mask(path, (512, 512), "restore.mask")
    assert refused.value.code == "invalid_mask" and refused.value.message.startswith("restore.mask (damage.png): ") and reason in refused.value.message
