"""Real face models on real photos: found where there is a face, drift small for the same
photo perturbed and large between different people (measured on this model)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine.errors import ConfigError
from engine.identity.faces import EMBEDDED_PACK, drift, embed_faces, locate_face_models


def _rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)


def _centre_crop(rgb: np.ndarray, fraction: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    h, w = int(height * fraction), int(width * fraction)
    y, x = (height - h) // 2, (width - w) // 2
    return np.ascontiguousarray(rgb[y : y + h, x : x + w])


def test_embedded_models_are_found_without_download(tmp_path):
    files = locate_face_models(tmp_path, "buffalo_l", require_pack=False)
    assert files.embedded and files.pack == EMBEDDED_PACK
    assert files.detector.name == "scrfd_500m_bnkps.onnx" and files.recognizer.name == "w600k_mbf.onnx"


def test_required_pack_missing_is_a_clear_refusal(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        locate_face_models(tmp_path, "buffalo_l", require_pack=True)
    assert str(tmp_path / "insightface" / "buffalo_l") in excinfo.value.message


def test_staged_pack_is_preferred(tmp_path):
    embedded = locate_face_models(tmp_path, "buffalo_l", require_pack=False)
    pack = tmp_path / "insightface" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(embedded.detector.read_bytes())
    with pytest.raises(ConfigError, match="lacks a recogniser"):
        locate_face_models(tmp_path, "buffalo_l", require_pack=False)
    (pack / "w600k_r50.onnx").write_bytes(embedded.recognizer.read_bytes())
    files = locate_face_models(tmp_path, "buffalo_l", require_pack=False)
    assert not files.embedded and files.detector == pack / "det_10g.onnx"


def test_one_face_on_the_astronaut_none_on_the_coffee(face_models, astronaut_rgb, no_face_rgb):
    faces = face_models.detect(astronaut_rgb)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 150 < x1 < x2 < 300 and 40 < y1 < y2 < 200  # her face, not the flag or the shuttle
    assert face_models.detect(no_face_rgb) == []


def test_group_photo_faces_left_to_right(face_models, group_rgb):
    faces = face_models.detect(group_rgb)
    assert len(faces) == 6
    assert [f.center[0] for f in faces] == sorted(f.center[0] for f in faces)


def test_drift_separates_the_same_face_from_other_people(face_models, astronaut_rgb, group_rgb):
    (_, reference), = embed_faces(face_models, astronaut_rgb)
    assert reference.shape == (512,) and abs(float(np.linalg.norm(reference)) - 1.0) < 1e-5
    variants = {"rot-10": _rotate(astronaut_rgb, -10), "rot+10": _rotate(astronaut_rgb, 10), "crop80": _centre_crop(astronaut_rgb, 0.8)}
    same = {}
    for name, rgb in variants.items():
        (face, embedding), = embed_faces(face_models, rgb)
        same[name] = drift(reference, embedding)
    others = [drift(reference, embedding) for _, embedding in embed_faces(face_models, group_rgb)]
    assert len(others) == 6
    # Measured here with buffalo_s: same face 0.018-0.024, other people 0.95-1.03.
    assert max(same.values()) < 0.05, same
    assert min(others) > 0.8, others
    assert min(others) - max(same.values()) > 0.75
    assert max(same.values()) < 0.18 < min(others)  # the lock threshold sits in the gap


def test_drift_properties():
    a = np.array([1.0, 0.0])
    assert drift(a, a) == 0.0
    assert drift(a, np.array([0.0, 3.0])) == pytest.approx(1.0)
    assert drift(a, -a) == pytest.approx(2.0)
