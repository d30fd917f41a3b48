"""The retouch guards on a real photo (issue 15): a blur and a colour shift inside the region masks
barely move ArcFace drift, and are caught by the texture and ΔE limits; an untouched photo
passes; a composite leaves every pixel outside its alpha byte-identical."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine.identity.faces import drift
from engine.identity.landmarks import LandmarkModels
from engine.measure.texture import AcceptLimits, composite, landmark_shift, measure_edit
from engine.identity.regions import feathered, region_masks


@pytest.fixture(scope="module")
def astronaut_masks(face_models, astronaut_rgb):
    marks = LandmarkModels(["CPUExecutionProvider"], threads=1).find(astronaut_rgb, max(face_models.detect(astronaut_rgb), key=lambda f: f.area))
    masks = region_masks(astronaut_rgb, marks)
    union = np.zeros(astronaut_rgb.shape[:2], dtype=bool)
    for region in masks.values():
        union |= region.mask
    assert union.sum() > 1000  # under_eye, smile_lines and chin on this photo
    return marks, union, feathered(union, marks.iod)


def _drift(face_models, original: np.ndarray, edited: np.ndarray) -> float:
    face = max(face_models.detect(original), key=lambda f: f.area)
    return drift(face_models.embed(original, face.keypoints), face_models.embed(edited, face.keypoints))


@pytest.mark.parametrize("edit, caught_by", [
    (lambda rgb: cv2.GaussianBlur(rgb, (0, 0), 1.0), "texture kept"),  # mild: ΔE 1.3, drift 0.013, texture kept 0.58
    (lambda rgb: np.clip(rgb.astype(int) + (-8, 0, 12), 0, 255).astype(np.uint8), "colour shift"),  # ΔE 4.0, drift 0.010
])
def test_edits_drift_cannot_see_are_rejected_by_texture_and_colour(face_models, astronaut_rgb, astronaut_masks, edit, caught_by):
    marks, mask, alpha = astronaut_masks
    pasted = composite(astronaut_rgb, edit(astronaut_rgb), alpha)
    assert pasted.changed_outside == 0
    moved = _drift(face_models, astronaut_rgb, pasted.rgb)
    assert moved < 0.02  # what identity drift alone would let through
    measures = measure_edit(astronaut_rgb, pasted.rgb, mask, marks.iod, drift=moved)
    assert measures.texture_measurable, measures.texture_note
    accepted, reasons = AcceptLimits().judge(measures)
    assert not accepted and any(reason.startswith(caught_by) for reason in reasons), (measures.facts(), reasons)


def test_an_untouched_photo_passes_every_guard(face_models, astronaut_rgb, astronaut_masks):
    marks, mask, alpha = astronaut_masks
    pasted = composite(astronaut_rgb, astronaut_rgb.copy(), alpha)
    assert np.array_equal(pasted.rgb, astronaut_rgb)
    measures = measure_edit(astronaut_rgb, pasted.rgb, mask, marks.iod, drift=_drift(face_models, astronaut_rgb, pasted.rgb),
                            landmark_shift=landmark_shift(marks.points, marks.points, marks.iod))
    assert measures.texture_ratio == pytest.approx(1.0) and measures.delta_e == pytest.approx(0.0, abs=1e-9)
    assert AcceptLimits().judge(measures) == (True, [])


def test_a_composite_keeps_every_pixel_outside_its_alpha(astronaut_rgb, astronaut_masks):
    _, _, alpha = astronaut_masks
    noise = np.random.default_rng(0).integers(0, 256, astronaut_rgb.shape, dtype=np.uint8)
    pasted = composite(astronaut_rgb, noise, alpha)
    outside = alpha == 0
    assert np.array_equal(pasted.rgb[outside], astronaut_rgb[outside])
    assert not np.array_equal(pasted.rgb[~outside], astronaut_rgb[~outside]) and pasted.support_px == int((~outside).sum())


def test_a_face_too_small_for_skin_texture_is_not_judged_on_it(astronaut_rgb, astronaut_masks):
    marks, mask, _ = astronaut_masks
    blurred = cv2.GaussianBlur(astronaut_rgb, (0, 0), 3)
    measures = measure_edit(astronaut_rgb, blurred, mask, iod=20.0)
    assert not measures.texture_measurable and measures.texture_note.startswith("texture_not_measurable")
    accepted, reasons = AcceptLimits(max_delta_e=100).judge(measures)
    assert accepted and not reasons  # the ratio is reported, not judged
    assert measures.texture_ratio is not None and measures.texture_ratio < 0.7
