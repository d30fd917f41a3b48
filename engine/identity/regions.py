"""Facial region masks for retouching, built on the face's landmarks (engine.identity.landmarks), never on
fixed fractions of a crop.

Every region is drawn in the face's own frame: origin between the eye centres, u along the eye line
(image-left to image-right), v perpendicular to it (towards the mouth), both in inter-ocular
distances (IOD). So a tilted or smaller face gets the same regions, turned and scaled with it.

- forehead     above the brows' upper edge, FOREHEAD_HEIGHT IOD high, between the brows' outer ends
- under_eye    below each lower eyelid, between the eye's corners (both eyes: one region)
- smile_lines  the nasolabial folds: from each nose wing down past the mouth corner
- chin         below the lower lip, above the jaw contour, between the mouth corners

Protected features (eyes, brows, lips, the nose base), each grown by a margin, are always cut out.
A skin gate then keeps only skin: a colour model of two cheek samples in CIELAB, chroma (a*, b*)
by Mahalanobis distance plus a one-sided lightness bound (FINDINGS: with L* in the model wrinkle
shadows drop out; with chroma alone blond hair gets in). A region that keeps less than
`min_skin` of its area after the cut and the gate (hair over the forehead, glasses, the photo's
edge) is `not_applicable`: it is reported, never inpainted.

Each region also has a feathered alpha for compositing: the mask blurred by FEATHER IOD, exactly 0
beyond its support, so a composite leaves every pixel outside it byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from engine.identity import landmarks as lm
REGIONS = ("forehead", "under_eye", "smile_lines", "chin")
FOREHEAD_HEIGHT = 0.70  # IOD above the brows' top edge
BROW_GAP = 0.10  # IOD between the brows and the forehead region
UNDER_EYE_GAP = 0.06  # IOD below the lower lid
UNDER_EYE_HEIGHT = 0.30
PROTECT_MARGIN = 0.06  # IOD by which protected features are grown before they are cut out
CHEEK_SAMPLES = ((-0.62, 0.55), (0.62, 0.55))  # (u, v) of the two skin samples, IOD
CHEEK_RADIUS = 0.12
CHROMA_LIMIT = 3.7  # Mahalanobis distance in (a*, b*): chi-square 2 dof at 0.999
LIGHTNESS_ABOVE = 3.0  # L* may be at most this many standard deviations above the cheeks' mean (plus 4)
MIN_SKIN = 0.5  # a region keeping less of its area is not_applicable
FEATHER = 0.03  # IOD: sigma of the alpha's edge (at least one pixel)


@dataclass(frozen=True)
class FaceFrame:
    """The face's own axes: photo point = origin + iod x (u x axis_u + v x axis_v)."""

    origin: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    iod: float

    @classmethod
    def of(cls, marks: lm.Landmarks) -> "FaceFrame":
        left, right = marks.left_eye, marks.right_eye
        axis_u = (right - left) / np.linalg.norm(right - left)
        return cls(origin=(left + right) / 2.0, axis_u=axis_u, axis_v=np.array([-axis_u[1], axis_u[0]]), iod=marks.iod)

    def to_photo(self, uv: np.ndarray) -> np.ndarray:
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
        return self.origin + self.iod * (uv[:, :1] * self.axis_u + uv[:, 1:] * self.axis_v)

    def to_face(self, xy: np.ndarray) -> np.ndarray:
        d = (np.asarray(xy, dtype=np.float64).reshape(-1, 2) - self.origin) / self.iod
        return np.stack([d @ self.axis_u, d @ self.axis_v], axis=1)


@dataclass(frozen=True)
class RegionMask:
    """One region of one face. `mask`: the pixels to edit (the region, protected features cut out,
    skin only); `alpha`: its feathered compositing weight (float32, 0 outside its support)."""

    name: str
    mask: np.ndarray  # bool, the photo's size
    alpha: np.ndarray  # float32 0..1, the photo's size
    drawn_px: int  # the region as drawn, before the cut and the gate
    kept: float  # the share of it that is skin and not protected
    applicable: bool
    reason: str

    def facts(self) -> dict[str, object]:
        return {"region": self.name, "applicable": self.applicable, "reason": self.reason, "drawn_px": self.drawn_px,
                "kept": round(self.kept, 4), "mask_px": int(self.mask.sum()), "feather_support_px": int((self.alpha > 0).sum()),
                "bbox": self.bbox}

    @property
    def bbox(self) -> list[int] | None:
        """[x0, y0, x1, y1) of the feathered support (what compositing may change), None when empty:
        where a reviewer looks for the edit (the report's before/after close-ups)."""
        ys, xs = np.nonzero(self.alpha > 0)
        return None if xs.size == 0 else [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def region_masks(rgb: np.ndarray, marks: lm.Landmarks, names: tuple[str, ...] = REGIONS, *, min_skin: float = MIN_SKIN) -> dict[str, RegionMask]:
    """The masks of `names` for the face whose landmarks are `marks`, in photo `rgb`."""
    frame = FaceFrame.of(marks)
    shape = rgb.shape[:2]
    protected = protected_features(marks, shape, frame.iod)
    skin = skin_gate(rgb, frame)
    out: dict[str, RegionMask] = {}
    for name in names:
        drawn = fill_polygons(shape, [frame.to_photo(polygon) for polygon in _REGION_POLYGONS[name](marks, frame)])
        drawn_px = int(drawn.sum())
        mask = drawn & ~protected & skin
        kept = float(mask.sum()) / drawn_px if drawn_px else 0.0
        if drawn_px == 0:
            applicable, reason = False, "the region lies outside the photo"
        elif kept < min_skin:
            applicable, reason = False, f"only {kept:.0%} of the region is unprotected skin (at least {min_skin:.0%} needed): hair, glasses or the photo's edge"
        else:
            applicable, reason = True, ""
        if not applicable:
            mask = np.zeros(shape, dtype=bool)
        out[name] = RegionMask(name=name, mask=mask, alpha=feathered(mask, frame.iod), drawn_px=drawn_px, kept=kept, applicable=applicable, reason=reason)
    return out


def protected_features(marks: lm.Landmarks, shape: tuple[int, int], iod: float, margin: float = PROTECT_MARGIN) -> np.ndarray:
    """Eyes, brows, lips and the nose base (their convex hulls), grown by `margin` IOD."""
    hulls = [cv2.convexHull(marks.points[list(group)].astype(np.float32)).reshape(-1, 2)
             for group in (lm.EYE_LEFT, lm.EYE_RIGHT, lm.BROW_LEFT, lm.BROW_RIGHT, lm.MOUTH, lm.NOSE_BASE)]
    mask = fill_polygons(shape, hulls).astype(np.uint8)
    radius = max(1, int(round(margin * iod)))
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))).astype(bool)


def skin_gate(rgb: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Pixels whose colour is the cheeks' skin: (a*, b*) within CHROMA_LIMIT Mahalanobis distance
    of the cheek samples, and L* not above their mean by more than LIGHTNESS_ABOVE deviations."""
    from skimage.color import rgb2lab

    height, width = rgb.shape[:2]
    # Only the face's neighbourhood is converted (Lab of a whole 24 MP photo costs seconds).
    corners = frame.to_photo(np.array([[-1.6, -1.6], [1.6, -1.6], [1.6, 2.4], [-1.6, 2.4]]))
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, [width, height])
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, [width, height])
    gate = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return gate
    lab = rgb2lab(rgb[y0:y1, x0:x1])
    samples = fill_polygons((y1 - y0, x1 - x0), [], disks=[(frame.to_photo(np.array(uv))[0] - (x0, y0), CHEEK_RADIUS * frame.iod) for uv in CHEEK_SAMPLES])
    cheek = lab[samples]
    if len(cheek) < 8:
        return gate
    chroma = cheek[:, 1:]
    mean = chroma.mean(axis=0)
    inverse = np.linalg.inv(np.cov(chroma, rowvar=False) + np.eye(2) * 1.0)  # +1: a floor for very even skin (units of a*, b*)
    offset = lab[..., 1:] - mean
    distance = np.sqrt(np.einsum("...i,ij,...j->...", offset, inverse, offset))
    lightness_limit = cheek[:, 0].mean() + LIGHTNESS_ABOVE * cheek[:, 0].std() + 4.0
    gate[y0:y1, x0:x1] = (distance <= CHROMA_LIMIT) & (lab[..., 0] <= lightness_limit)
    return gate


def feathered(mask: np.ndarray, iod: float, feather: float = FEATHER) -> np.ndarray:
    """The mask's compositing alpha: blurred by `feather` IOD (sigma), exactly 0 below 1/255."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    sigma = max(1.0, feather * iod)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    alpha[alpha < 1.0 / 255.0] = 0.0
    return alpha


def fill_polygons(shape: tuple[int, int], polygons: list[np.ndarray], disks: list[tuple[np.ndarray, float]] = ()) -> np.ndarray:
    """A bool mask of filled polygons and disks (photo pixel coordinates), at 1/16 px precision."""
    canvas = np.zeros(shape, dtype=np.uint8)
    if polygons:
        cv2.fillPoly(canvas, [np.round(np.asarray(p) * 16).astype(np.int32) for p in polygons], 1, lineType=cv2.LINE_8, shift=4)
    for centre, radius in disks:
        cv2.circle(canvas, tuple(int(round(c * 16)) for c in centre), int(round(radius * 16)), 1, thickness=-1, shift=4)
    return canvas.astype(bool)


# ---------------------------------------------------------------------------- the regions, in face coordinates

def _forehead(marks: lm.Landmarks, frame: FaceFrame) -> list[np.ndarray]:
    brow_top = frame.to_face(marks.points[list(lm.BROW_LEFT_UPPER + lm.BROW_RIGHT_UPPER)])
    bottom = brow_top - (0.0, BROW_GAP)
    top_v = bottom[:, 1].min() - FOREHEAD_HEIGHT
    return [np.vstack([bottom, [[bottom[-1, 0], top_v], [bottom[0, 0], top_v]]])]


def _under_eye(marks: lm.Landmarks, frame: FaceFrame) -> list[np.ndarray]:
    polygons = []
    for eye in (lm.EYE_LEFT, lm.EYE_RIGHT):
        points = frame.to_face(marks.points[list(eye)])
        u0, u1 = points[:, 0].min(), points[:, 0].max()
        top = points[:, 1].max() + UNDER_EYE_GAP
        # A crescent: widest under the eye's centre, narrowing to its corners.
        us = np.linspace(u0, u1, 9)
        depth = UNDER_EYE_HEIGHT * np.sin(np.linspace(0.15, np.pi - 0.15, 9))
        polygons.append(np.vstack([np.stack([us, np.full(9, top)], axis=1), np.stack([us[::-1], top + depth[::-1]], axis=1)]))
    return polygons


def _smile_lines(marks: lm.Landmarks, frame: FaceFrame) -> list[np.ndarray]:
    polygons = []
    for side, ala, corner in ((-1.0, lm.ALA_LEFT, lm.MOUTH_LEFT), (1.0, lm.ALA_RIGHT, lm.MOUTH_RIGHT)):
        a, c = frame.to_face(marks.points[[ala, corner]])
        polygons.append(np.array([a + (side * 0.04, -0.06), a + (side * 0.30, -0.02), c + (side * 0.30, 0.22), c + (side * 0.04, 0.16)]))
    return polygons


def _chin(marks: lm.Landmarks, frame: FaceFrame) -> list[np.ndarray]:
    left, right, lip = frame.to_face(marks.points[[lm.MOUTH_LEFT, lm.MOUTH_RIGHT, lm.LOWER_LIP_BOTTOM]])
    u0, u1, top = left[0] + 0.04, right[0] - 0.04, lip[1] + 0.10
    contour = frame.to_face(marks.points[list(lm.CONTOUR)])
    jaw = contour[(contour[:, 0] > u0) & (contour[:, 0] < u1) & (contour[:, 1] > top)]
    if len(jaw) == 0:
        return []
    bottom = jaw[np.argsort(jaw[:, 0])] - (0.0, 0.10)
    return [np.vstack([[[u0, top], [u1, top]], [[u1, bottom[-1, 1]]], bottom[::-1], [[u0, bottom[0, 1]]]])]


_REGION_POLYGONS = {"forehead": _forehead, "under_eye": _under_eye, "smile_lines": _smile_lines, "chin": _chin}
