"""How much of a face a damage mask hides, measured, and whether a restoration may go on.

The source system states where restoring stops being honest: identity hallucination starts when
15-20 % of the facial features are missing, and inpainting turns into invention around 30 % of the
face; it should stop above 25 %. Those are the defaults of `CoverageLimits`, applied to:

- face_coverage     the masked share of the face region: the landmark contour (jaw, temple to
                    temple) closed over the forehead, FOREHEAD_HEIGHT IOD above the brows
- feature_coverage  the masked share of the eyes, brows, nose and mouth together, and `features`:
                    each one's own share (a mask equal to the mouth gives mouth 1.0)

Landmarks cannot be found on the damaged photo itself (damage breaks detectors), so they are found
on a classically pre-filled copy (`prefill`: OpenCV's TELEA inpainting inside the mask). That copy
only serves the measurement: it is never an output, and the audit says the landmarks came from it.

`load_mask` reads a damage mask (white = damaged) and refuses, naming the file, what cannot be
one: not a PNG (a JPEG's compression smears its edges), another size than the photo, empty, or
covering the whole photo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engine.identity import landmarks as lm
from engine.errors import JobError
from engine.identity.regions import FaceFrame, fill_polygons

FOREHEAD_HEIGHT = 0.75  # IOD above the brows' top edge: the face region's upper edge
PREFILL_RADIUS = 3  # px, TELEA's neighbourhood
FEATURES = {
    "left_eye": lm.EYE_LEFT, "right_eye": lm.EYE_RIGHT, "left_brow": lm.BROW_LEFT, "right_brow": lm.BROW_RIGHT,
    "nose": lm.NOSE, "mouth": lm.MOUTH,
}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CoverageLimits:
    """When a restoration is flagged or refused (job.toml [restore]); each is a share, 0-1, and a
    coverage must be *above* a limit to cross it."""

    flag_face: float = 0.15
    flag_feature: float = 0.15
    flag_any_feature: float = 0.50  # any one feature more than half masked
    refuse_face: float = 0.25
    refuse_feature: float = 0.20


@dataclass(frozen=True)
class Coverage:
    face: float
    feature: float
    features: dict[str, float] = field(default_factory=dict)
    face_px: int = 0
    masked_px: int = 0

    def verdict(self, limits: CoverageLimits) -> tuple[str, list[str]]:
        """("ok" | "flag" | "refuse", the reasons)."""
        refuse = [reason for value, limit, reason in (
            (self.face, limits.refuse_face, f"{self.face:.1%} of the face is masked (refused above {limits.refuse_face:.0%})"),
            (self.feature, limits.refuse_feature, f"{self.feature:.1%} of the eyes, brows, nose and mouth is masked (refused above {limits.refuse_feature:.0%})"),
        ) if value > limit]
        if refuse:
            return "refuse", refuse
        flag = [reason for value, limit, reason in (
            (self.face, limits.flag_face, f"{self.face:.1%} of the face is masked (flagged above {limits.flag_face:.0%})"),
            (self.feature, limits.flag_feature, f"{self.feature:.1%} of the features is masked (flagged above {limits.flag_feature:.0%})"),
        ) if value > limit]
        flag += [f"the {name.replace('_', ' ')} is {share:.0%} masked (flagged above {limits.flag_any_feature:.0%})"
                 for name, share in self.features.items() if share > limits.flag_any_feature]
        return ("flag", flag) if flag else ("ok", [])

    def facts(self) -> dict[str, object]:
        return {"face_coverage": round(self.face, 4), "feature_coverage": round(self.feature, 4),
                "features": {name: round(share, 4) for name, share in self.features.items()}, "face_px": self.face_px, "masked_px": self.masked_px}


def prefill(rgb: np.ndarray, mask: np.ndarray, radius: int = PREFILL_RADIUS) -> np.ndarray:
    """The photo with the masked pixels filled from their surroundings (OpenCV TELEA): for finding
    the face and its landmarks through the damage, never an output."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    filled = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    return cv2.cvtColor(filled, cv2.COLOR_BGR2RGB)


def face_region(marks: lm.Landmarks, shape: tuple[int, int]) -> np.ndarray:
    """The face: the landmark contour from temple to temple under the chin, closed over the
    forehead FOREHEAD_HEIGHT IOD above the brows."""
    frame = FaceFrame.of(marks)
    contour = frame.to_face(marks.points[list(lm.CONTOUR)])
    brows = frame.to_face(marks.points[list(lm.BROW_LEFT + lm.BROW_RIGHT)])
    top = brows[:, 1].min() - FOREHEAD_HEIGHT
    over = np.stack([np.linspace(contour[-1, 0], contour[0, 0], 9), np.full(9, top)], axis=1)  # image-right temple -> image-left, at the top
    return fill_polygons(shape, [frame.to_photo(np.vstack([contour, over]))])


def feature_masks(marks: lm.Landmarks, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Each feature's convex hull (eyes, brows, nose, mouth)."""
    return {name: fill_polygons(shape, [cv2.convexHull(marks.points[list(group)].astype(np.float32)).reshape(-1, 2)]) for name, group in FEATURES.items()}


def coverage(mask: np.ndarray, marks: lm.Landmarks) -> Coverage:
    """How much of the face and of each feature `mask` (True = damaged) hides."""
    shape = mask.shape
    face = face_region(marks, shape)
    features = feature_masks(marks, shape)
    every_feature = np.zeros(shape, dtype=bool)
    for region in features.values():
        every_feature |= region
    face_px = int(face.sum())
    return Coverage(
        face=float((mask & face).sum()) / face_px if face_px else 0.0,
        feature=float((mask & every_feature).sum()) / max(1, int(every_feature.sum())),
        features={name: float((mask & region).sum()) / max(1, int(region.sum())) for name, region in features.items()},
        face_px=face_px, masked_px=int(mask.sum()),
    )


def keyed_mask(path: Path, photo: np.ndarray, key_colour: tuple[int, ...], tolerance: int, key: str) -> np.ndarray:
    """The damage painted in `key_colour` (each channel within `tolerance`) into a copy of the
    photo (a PNG of its size); refused like `load_mask`, and when the copy differs from the photo
    anywhere but where it is painted (another photo, or a lossy copy)."""
    painted_rgb = _read_png(path, key, lambda image: np.asarray(image.convert("RGB")))
    where = f"{key} ({Path(path).name})"
    if painted_rgb.shape != photo.shape:
        raise JobError("invalid_mask", f"{where}: is {painted_rgb.shape[1]}x{painted_rgb.shape[0]} px and the photo {photo.shape[1]}x{photo.shape[0]}: "
                                       "a painted copy has the photo's size")
    mask = np.all(np.abs(painted_rgb.astype(int) - np.asarray(key_colour, dtype=int)) <= tolerance, axis=-1)
    _check_marks(mask, where)
    unpainted = ~mask
    differs = np.any(painted_rgb[unpainted] != photo[unpainted], axis=-1).mean() if unpainted.any() else 0.0
    if differs > 0.01:
        raise JobError("invalid_mask", f"{where}: {differs:.0%} of its unpainted pixels differ from the photo: paint the damage into a lossless "
                                       "copy of this very photo")
    return mask


def _read_png(path: Path, key: str, convert) -> np.ndarray:
    from PIL import Image

    where = f"{key} ({Path(path).name})"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(8)
    except OSError as exc:
        raise JobError("invalid_mask", f"{where}: cannot be read ({exc.strerror or exc})") from None
    if magic != _PNG_MAGIC:
        kind = "a JPEG" if magic[:3] == b"\xff\xd8\xff" else "not a PNG"
        raise JobError("invalid_mask", f"{where}: is {kind}; a mask must be a lossless PNG (compression smears its edges): white = damaged, black = intact")
    try:
        with Image.open(path) as image:
            return convert(image)
    except OSError as exc:
        raise JobError("invalid_mask", f"{where}: is not a readable PNG ({exc})") from None


def _check_marks(mask: np.ndarray, where: str) -> None:
    if not mask.any():
        raise JobError("invalid_mask", f"{where}: marks no pixel as damaged: there is nothing to restore")
    if mask.all():
        raise JobError("invalid_mask", f"{where}: marks the whole photo as damaged: nothing is left to restore from")


def load_mask(path: Path, shape: tuple[int, int], key: str) -> np.ndarray:
    """A damage mask (white = damaged) the photo's size, as bools; JobError naming `key` and the
    file for anything that cannot be one."""
    where = f"{key} ({Path(path).name})"
    grey = _read_png(path, key, lambda image: np.asarray(image.convert("L")))
    if grey.shape != tuple(shape):
        raise JobError("invalid_mask", f"{where}: is {grey.shape[1]}x{grey.shape[0]} px and the photo {shape[1]}x{shape[0]}: a mask has the photo's size")
    mask = grey >= 128
    _check_marks(mask, where)
    return mask
