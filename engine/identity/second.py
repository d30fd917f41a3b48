"""A second identity model, of another family than ArcFace, used only for reporting.

Seeds are chosen by ArcFace drift (stage verify). Reporting the ArcFace drift of renders that
ArcFace chose would be reporting the metric that was optimised, so every scored render is
also measured by dlib's 128-D ResNet face descriptor (`dlib_face_recognition_resnet_model_v1`:
another architecture, another training set and loss; weights shipped offline by the PyPI
package face_recognition_models, run by dlib-bin), and the report flags renders where the two
models disagree.

Never used to choose seeds: only the render stage calls this module, when it writes
drift_report.json, after verify has locked the seed.

- distance = Euclidean distance between 128-D descriptors (dlib's convention): at most 0.6 is
  "same person" by dlib's tolerance, at most 0.4 by a strict one.
- The reference is the mean descriptor of the prepared `base` image of every photo.
- Each render's face is the one ArcFace scored (the largest SCRFD face), aligned by dlib's own
  5-point shape predictor and chip extraction: the two models are asked about the same face,
  so they can disagree only about identity.
- Disagreement needs dlib to be sure: ArcFace within the lock threshold while dlib says
  "another person" even by its loose tolerance (> 0.6), or ArcFace beyond the threshold while
  dlib says "same person" even by its strict tolerance (<= 0.4). Between 0.4 and 0.6 dlib is
  inconclusive and nothing is flagged.

Measured on this project's 2-core CPU (tests/integration/test_identity2.py): loading 0.5-0.8 s,
one descriptor ~0.1 s. dlib is imported only when a face has to be described, so a job whose
renders hold no face (the demo model) never loads it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine import layout
from engine.identity.faces import FaceModels
from engine.hashcache import sha256_of
from engine.images import read_rgb

MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
TOLERANCE = 0.6  # dlib's documented same-person tolerance
STRICT_TOLERANCE = 0.4
_SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
_RECOGNIZER = "dlib_face_recognition_resnet_model_v1.dat"
DISAGREEMENT_RULE = (
    f"flagged when ArcFace drift <= the lock threshold but the {MODEL_NAME} distance > {TOLERANCE} "
    f"(dlib: another person), or ArcFace drift > the lock threshold but the distance <= {STRICT_TOLERANCE} "
    f"(dlib, strict: same person); a distance between {STRICT_TOLERANCE} and {TOLERANCE} is inconclusive"
)


@dataclass(frozen=True)
class Identity2Files:
    shape_predictor: Path
    recognizer: Path


def locate() -> tuple[Identity2Files | None, str]:
    """The model files and "", or None and why they cannot be used. Imports nothing heavy."""
    if importlib.util.find_spec("dlib") is None:
        return None, "dlib is not installed (pip install dlib-bin)"
    spec = importlib.util.find_spec("face_recognition_models")  # find, do not import: it imports pkg_resources
    if spec is None or not spec.submodule_search_locations:
        return None, "face_recognition_models is not installed (pip install face_recognition_models)"
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = Identity2Files(shape_predictor=folder / _SHAPE_PREDICTOR, recognizer=folder / _RECOGNIZER)
    for path in (files.shape_predictor, files.recognizer):
        if not path.is_file():
            return None, f"face_recognition_models lacks {path.name} (expected at {path}); reinstall it"
    return files, ""


def model_hashes(files: Identity2Files) -> dict[str, str]:
    """sha256 of both dlib model files, keyed like the other models of the manifest."""
    return {
        f"identity2/{files.shape_predictor.name}": sha256_of(files.shape_predictor),
        f"identity2/{files.recognizer.name}": sha256_of(files.recognizer),
    }


def settings() -> dict[str, Any]:
    """What the second model's numbers depend on besides its files (the render stage's
    fingerprint; the files' hashes come with its `identity2` model role, engine.resources)."""
    files, reason = locate()
    if files is None:
        return {"unavailable": reason}
    return {"model": MODEL_NAME, "tolerance": TOLERANCE, "strict_tolerance": STRICT_TOLERANCE}


class SecondIdentityModel:
    """dlib's 5-point shape predictor + 128-D ResNet descriptor (engine.resources keeps one per process)."""

    def __init__(self, files: Identity2Files) -> None:
        import dlib

        self.files = files
        self._shape_predictor = dlib.shape_predictor(str(files.shape_predictor))
        self._recognizer = dlib.face_recognition_model_v1(str(files.recognizer))
        self._dlib = dlib

    def describe(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The 128-D descriptor of the face in `box` (x1, y1, x2, y2 pixels) of an RGB image."""
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        image = np.ascontiguousarray(rgb, dtype=np.uint8)
        shape = self._shape_predictor(image, self._dlib.rectangle(x1, y1, x2, y2))
        return np.asarray(self._recognizer.compute_face_descriptor(image, shape), dtype=np.float64)

    def describe_largest(self, faces: FaceModels, rgb: np.ndarray) -> np.ndarray | None:
        """The descriptor of the largest face SCRFD finds (the one ArcFace scores), or None."""
        detected = faces.detect(rgb)
        if not detected:
            return None
        return self.describe(rgb, max(detected, key=lambda f: f.area).box)


def distance(reference: np.ndarray, other: np.ndarray) -> float:
    """Euclidean distance of two 128-D descriptors: ~0.1 same photo, <= 0.6 same person (dlib)."""
    return float(np.linalg.norm(np.asarray(reference, dtype=np.float64) - np.asarray(other, dtype=np.float64)))


def verdict(value: float | None) -> str | None:
    """dlib's own reading of a distance: same_strict (<= 0.4), same (<= 0.6) or different."""
    if value is None:
        return None
    if value <= STRICT_TOLERANCE:
        return "same_strict"
    return "same" if value <= TOLERANCE else "different"


def models_disagree(drift: float | None, threshold: float, value: float | None) -> bool | None:
    """Whether ArcFace (drift against the lock threshold) and dlib disagree; None when either is missing."""
    if drift is None or value is None:
        return None
    if drift <= threshold:
        return value > TOLERANCE
    return value <= STRICT_TOLERANCE


def annotate(job_dir: Path, rows: list[dict[str, Any]], faces: FaceModels, threshold: float,
             load: Callable[[], SecondIdentityModel | None]) -> dict[str, Any]:
    """Add `identity2_distance`, `identity2_verdict` and `models_disagree` to every row of the
    drift report (rows name their image in `file`, relative to `job_dir`); returns what the
    report says about the second model. `load()` gives the model (the render stage's
    `ctx.use("identity2")`, which records its files as used); it is called only when a render
    holds a face, so a job whose renders hold none (the demo model) never loads dlib."""
    for row in rows:
        row.update(identity2_distance=None, identity2_verdict=None, models_disagree=None)
    info: dict[str, Any] = {
        "model": f"{MODEL_NAME} (dlib 128-D ResNet)",
        "distance": "Euclidean distance between 128-D descriptors of the reference and the render; null where no face was found",
        "reference": "mean descriptor of the prepared base image of every photo",
        "tolerance": TOLERANCE,
        "strict_tolerance": STRICT_TOLERANCE,
        "disagreement_rule": DISAGREEMENT_RULE,
        "used_for_seed_selection": False,
    }
    files, reason = locate()
    if files is None:
        return {**info, "available": False, "reason": reason}
    info.update(available=True, versions=_versions(), sha256=model_hashes(files))
    wanted = [row for row in rows if row.get("face_found")]
    if not wanted:
        return {**info, "measured": 0, "disagreements": 0, "note": "no face found in any render: nothing to measure"}
    model = load()
    if model is None:
        return {**info, "available": False, "reason": "the second identity model could not be loaded"}
    reference = reference_descriptor(job_dir, model, faces)
    if reference is None:
        return {**info, "measured": 0, "disagreements": 0, "note": "no face found in the prepared base images by the detector"}
    for row in wanted:
        descriptor = model.describe_largest(faces, read_rgb(job_dir / row["file"]))
        value = None if descriptor is None else round(distance(reference, descriptor), 6)
        row.update(identity2_distance=value, identity2_verdict=verdict(value), models_disagree=models_disagree(row.get("drift"), threshold, value))
    measured = sum(row["identity2_distance"] is not None for row in rows)
    return {**info, "measured": measured, "disagreements": sum(bool(row["models_disagree"]) for row in rows)}


def reference_descriptor(job_dir: Path, model: SecondIdentityModel, faces: FaceModels) -> np.ndarray | None:
    """Mean descriptor of the prepared base image of every photo (engine.layout.prepared_images)."""
    descriptors = []
    for image in layout.prepared_images(job_dir):
        if image.is_base:
            descriptor = model.describe_largest(faces, read_rgb(job_dir / image.file))
            if descriptor is not None:
                descriptors.append(descriptor)
    return np.mean(descriptors, axis=0) if descriptors else None


def _versions() -> dict[str, str]:
    versions = {}
    for key, packages in (("dlib", ("dlib-bin", "dlib")), ("face_recognition_models", ("face_recognition_models",))):
        versions[key] = "not installed"
        for package in packages:
            try:
                versions[key] = f"{importlib.metadata.version(package)} ({package})"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions

