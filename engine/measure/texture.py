"""What an edit did to a face, measured where identity drift cannot see it.

ArcFace drift barely moves under the failures a retoucher fears most. On the real astronaut
(tests/integration/test_measures.py, buffalo_s), inside her under-eye, smile-line and chin masks:
a Gaussian blur of sigma 1 px moved drift by 0.013 while the fine texture fell to 0.58 of the
original's (ΔE2000 1.3); a colour shift of -8 R, +12 B moved drift by 0.010 at ΔE2000 4.0. (A blur
of 3 px moves drift by 0.10 over all three regions, mostly through the smile lines, but by 0.011
under the eyes alone.) So every edit is also measured, inside its mask, against the original at
its native resolution:

- texture_ratio    fine-texture energy kept: the variance of a difference-of-Gaussians band
                   (sigma TEXTURE_BAND px) of the edited photo's L* over the original's. 1 = as
                   much texture as before; plastic skin is well below 1, added noise above.
- laplacian_ratio  the same for the variance of the Laplacian (a second, common sharpness measure).
- delta_e          the mean CIEDE2000 colour difference (skimage), ~1 just noticeable.
- landmark_shift   the mean distance between the 106 landmarks found on each, in IOD (NME).

`texture_measurable` is False when the face is too small for the band to hold skin texture (IOD
under MIN_TEXTURE_IOD px: a pixel is then more than ~2 mm of skin) or the original has almost no
fine texture in the mask (an upscaled or already smoothed photo): the ratios are then reported but
not judged. `AcceptLimits` accepts or rejects an edit, with every reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from engine.schema import Float, rule

TEXTURE_BAND = (0.7, 2.0)  # px: sigmas of the difference of Gaussians
MIN_TEXTURE_IOD = 32.0  # px
MIN_TEXTURE_VARIANCE = 0.5  # (L* units)^2 of the original's band inside the mask
MIN_MASK_PX = 64


@dataclass(frozen=True)
class EditMeasures:
    texture_ratio: float | None
    laplacian_ratio: float | None
    texture_measurable: bool
    texture_note: str
    delta_e: float | None
    landmark_shift: float | None  # IOD; None when not measured
    drift: float | None = None  # ArcFace drift to the original, when the caller measured it
    mask_px: int = 0

    def facts(self) -> dict[str, object]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(float(value), 4)

        return {"texture_ratio": rounded(self.texture_ratio), "laplacian_ratio": rounded(self.laplacian_ratio),
                "texture_measurable": self.texture_measurable, "texture_note": self.texture_note, "delta_e": rounded(self.delta_e),
                "landmark_shift_iod": rounded(self.landmark_shift), "drift": rounded(self.drift), "mask_px": self.mask_px}


@dataclass(frozen=True)
class AcceptLimits:
    """When an edit is accepted: job.toml's [retouch.accept] as it is read (engine.kinds.retouch;
    the schema's rules in the field metadata)."""

    max_drift: float = field(default=0.05, metadata=rule(Float(0.0, 2.0)))
    texture_min: float = field(default=0.70, metadata=rule(Float(0.0, 10.0)))
    texture_max: float = field(default=1.30, metadata=rule(Float(0.0, 10.0)))
    max_delta_e: float = field(default=2.0, metadata=rule(Float(0.0, 100.0)))
    max_landmark_shift: float = field(default=0.03, metadata=rule(Float(0.0, 1.0)))  # IOD

    def judge(self, measures: EditMeasures) -> tuple[bool, list[str]]:
        """(accepted, the reasons it is not)."""
        reasons: list[str] = []
        if measures.drift is not None and measures.drift > self.max_drift:
            reasons.append(f"ArcFace drift {measures.drift:.4f} > {self.max_drift}")
        if measures.texture_measurable and measures.texture_ratio is not None:
            if measures.texture_ratio < self.texture_min:
                reasons.append(f"texture kept {measures.texture_ratio:.2f} < {self.texture_min} (smoothed: plastic skin)")
            elif measures.texture_ratio > self.texture_max:
                reasons.append(f"texture {measures.texture_ratio:.2f} > {self.texture_max} (noise or artefacts added)")
        if measures.delta_e is not None and measures.delta_e > self.max_delta_e:
            reasons.append(f"colour shift ΔE2000 {measures.delta_e:.2f} > {self.max_delta_e}")
        if measures.landmark_shift is not None and measures.landmark_shift > self.max_landmark_shift:
            reasons.append(f"landmarks moved {measures.landmark_shift:.3f} IOD > {self.max_landmark_shift}")
        return not reasons, reasons


def measure_edit(original: np.ndarray, edited: np.ndarray, mask: np.ndarray, iod: float, *,
                 landmark_shift: float | None = None, drift: float | None = None) -> EditMeasures:
    """Measure `edited` against `original` (both H x W x 3 uint8 RGB, the same size) inside `mask`."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    if original.shape != edited.shape:
        raise ValueError(f"the edited photo is {edited.shape[:2]}, the original {original.shape[:2]}: compare at the native size")
    mask = np.asarray(mask, dtype=bool)
    count = int(mask.sum())
    if count < MIN_MASK_PX:
        return EditMeasures(None, None, False, f"the mask has {count} px (fewer than {MIN_MASK_PX})", None, landmark_shift, drift, count)
    ys, xs = np.nonzero(mask)
    pad = int(np.ceil(4 * TEXTURE_BAND[1])) + 2  # the filters' reach: the crop's border does not leak in
    y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + pad + 1)
    inside = mask[y0:y1, x0:x1]
    lab_original = rgb2lab(original[y0:y1, x0:x1])
    lab_edited = rgb2lab(edited[y0:y1, x0:x1])
    delta_e = float(deltaE_ciede2000(lab_original, lab_edited)[inside].mean())
    band_original = _band(lab_original[..., 0])[inside].var()
    band_edited = _band(lab_edited[..., 0])[inside].var()
    laplace_original = cv2.Laplacian(lab_original[..., 0], cv2.CV_64F)[inside].var()
    laplace_edited = cv2.Laplacian(lab_edited[..., 0], cv2.CV_64F)[inside].var()
    texture_ratio = float(band_edited / band_original) if band_original > 0 else None
    laplacian_ratio = float(laplace_edited / laplace_original) if laplace_original > 0 else None
    if iod < MIN_TEXTURE_IOD:
        measurable, note = False, f"texture_not_measurable: the face is {iod:.0f} px between the eyes (under {MIN_TEXTURE_IOD:.0f})"
    elif band_original < MIN_TEXTURE_VARIANCE:
        measurable, note = False, f"texture_not_measurable: the original holds almost no fine texture here (band variance {band_original:.2f})"
    else:
        measurable, note = True, ""
    return EditMeasures(texture_ratio, laplacian_ratio, measurable, note, delta_e, landmark_shift, drift, count)


def landmark_shift(before: np.ndarray, after: np.ndarray, iod: float) -> float:
    """The mean distance between two sets of the same landmarks, in IOD (NME)."""
    return float(np.linalg.norm(np.asarray(before) - np.asarray(after), axis=1).mean() / iod)


def _band(lightness: np.ndarray) -> np.ndarray:
    fine, coarse = TEXTURE_BAND
    return cv2.GaussianBlur(lightness, (0, 0), fine) - cv2.GaussianBlur(lightness, (0, 0), coarse)


@dataclass(frozen=True)
class Composite:
    """An edit pasted into the original through a feathered alpha (engine.identity.regions.feathered)."""

    rgb: np.ndarray
    changed_outside: int  # pixels outside the alpha's support that differ from the original: 0, recorded per variant
    support_px: int = field(default=0)


def composite(original: np.ndarray, edited: np.ndarray, alpha: np.ndarray) -> Composite:
    """original x (1 - alpha) + edited x alpha, rounded; outside alpha's support the original's
    bytes are copied, not recomputed (a model's output never touches them)."""
    if original.shape != edited.shape or original.shape[:2] != alpha.shape:
        raise ValueError("the original, the edit and the alpha must have the same size")
    support = alpha > 0
    out = original.copy()
    if support.any():  # blended inside the support's bounding box only: a 24 MP photo is not converted to floats whole
        ys, xs = np.nonzero(support)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        weight = alpha[box].astype(np.float64)[..., None]
        blended = np.clip(np.rint(original[box].astype(np.float64) * (1.0 - weight) + edited[box].astype(np.float64) * weight), 0, 255).astype(np.uint8)
        out[box] = np.where(support[box][..., None], blended, original[box])
    return Composite(rgb=out, changed_outside=int(np.any(out[~support] != original[~support], axis=-1).sum()), support_px=int(support.sum()))
