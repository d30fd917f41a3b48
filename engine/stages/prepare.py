"""Stage 1, prepare: decode each photo, find the subject's face, remove the background,
crop around the face with proportional padding, resize, and write augmentations. A photo whose
edge cuts the face (or that shows the face alone, edge to edge) is refused as `face_cut_off`,
naming the room the crop needs beyond each edge; one with no face found as `no_face_found`.

Every prepared image is one affine warp of the (background-removed) photo: a square of side
`face side x (1 + 2 x padding)` around the face, rotated and/or scaled, resized to `size`.
Rotating the photo rather than the crop keeps real pixels in the corners. The same warp
maps the detector's 5 keypoints into each prepared image (recorded in prepare.json), so
`embed` aligns faces exactly where they are.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np

from engine.context import StageContext
from engine import layout
from engine.errors import JobError
from engine.identity.faces import Face, detect_in_a_border
from engine.faults import pause_point
from engine.fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from engine.images import load_photo, png_bytes
from engine.schema import to_plain

NAME = "prepare"
VERSION = 2  # 2: its models are declared (models()), the runner fingerprints them
OUTPUTS = (layout.PREPARED_DIR,)
MODELS = ("faces", "background")  # every model role it may use (engine.inventory checks them); models(ctx): this job's
# The crop is centred a little below the face box centre so that the chin and neck are kept.
_CENTER_SHIFT_DOWN = 0.1
# A face box this close to an edge (a fraction of its side) is cut off by it: SCRFD's box stops at
# the edge of what it sees (measured: the astronaut cut through her forehead gives a box 0.4 px
# from the top; cut at the box's own top, 4.7 px of a 114 px face).
_EDGE_TOLERANCE = 0.05
_EDGE_WORDS = {"left": "on the left", "top": "at the top", "right": "on the right", "bottom": "at the bottom"}


def models(ctx: StageContext) -> tuple[str, ...]:
    return ("faces", "background") if ctx.job.spec.prepare.remove_background else ("faces",)


def fingerprint(ctx: StageContext) -> dict[str, object]:
    settings = ctx.settings
    return {
        "subject": to_plain(ctx.job.spec.subject),
        "prepare": to_plain(ctx.job.spec.prepare),
        "input": to_plain(settings.input),
        "background": to_plain(settings.background),
        "detect": [settings.faces.detect_size, settings.faces.detect_threshold],
    }


def run(ctx: StageContext) -> None:
    spec, settings = ctx.job.spec, ctx.settings
    out_dir = ctx.path(layout.PREPARED_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    faces_model = ctx.use("faces")
    remover = _background_remover(ctx) if spec.prepare.remove_background else None
    face_index = dict(spec.subject.face_index)
    records = []
    for number, (name, path) in enumerate(zip(spec.subject.photos, ctx.job.photos)):
        photo = load_photo(path, name, settings.input.max_pixels, settings.background.fill_rgb)
        faces = [f for f in faces_model.detect(photo.rgb) if f.side >= settings.input.min_face_px]
        if not faces:  # none at all, or one that fills the photo to its edges: the border tells them apart
            framed = [f for f in detect_in_a_border(faces_model, photo.rgb) if f.side >= settings.input.min_face_px]
            if framed:
                _refuse_if_cut_off(name, max(framed, key=lambda f: f.area), photo.rgb.shape, spec.prepare.padding, found_in_border=True)
        chosen = _choose_face(name, faces, spec.subject.face, face_index.get(name), settings.input.ambiguous_face_ratio)
        face = faces[chosen]
        _refuse_if_cut_off(name, face, photo.rgb.shape, spec.prepare.padding, found_in_border=False)
        center, side = _crop_square(face, spec.prepare.padding)
        rgb, background = _remove_background(ctx, remover, photo.rgb, center, side)
        stem = f"{number}-{_safe_stem(name)}"
        variants = _variants(spec.prepare.rotations, spec.prepare.crops)
        smallest = side * min(scale for _, _, scale in variants)
        small_rgb, small_kps, small_center, small_side = _shrink(rgb, face.keypoints, center, side, smallest, spec.prepare.size)
        images = []
        for kind, angle, scale in variants:
            file_name = f"{stem}_{kind}.png"
            prepared, keypoints = _warp(small_rgb, small_kps, small_center, small_side * scale, angle, spec.prepare.size, settings.background.fill_rgb)
            atomic_write_bytes(out_dir / file_name, png_bytes(prepared, {"source": name, "variant": kind, "demo": str(ctx.demo).lower()}))
            images.append({"file": f"{layout.PREPARED_DIR}/{file_name}", "kind": kind, "angle": angle, "scale": scale, "keypoints": np.round(keypoints, 3).tolist()})
        records.append({
            "name": name,
            "sha256": sha256_file(path),
            "decode": photo.facts(),
            "faces": [f.facts() for f in faces],
            "chosen_face": chosen,
            "crop": {"center": [round(center[0], 3), round(center[1], 3)], "side": round(side, 3)},
            "background": background,
            "images": images,
        })
        ctx.log.info("photo_prepared", photo=name, faces=len(faces), chosen_face=chosen, images=len(images))
        pause_point(f"prepare:photo:{number}")
    atomic_write_json(ctx.path(layout.PREPARE_INFO), {"size": spec.prepare.size, "photos": records})


def _background_remover(ctx: StageContext):
    remover = ctx.use("background")
    if remover is not None:
        return remover
    path = ctx.resources.background_model_path()
    if ctx.settings.background.when_missing == "refuse":
        raise JobError(
            "background_model_missing",
            f"prepare.remove_background is on but no rembg model is staged at {path} "
            "(stage it, or set prepare.remove_background = false in job.toml, or background.when_missing = 'keep' in config.toml)",
        )
    ctx.audit.event("background_removal_skipped", reason="no rembg model staged", expected_at=str(path), fallback="original background kept")
    ctx.log.warning("background_removal_skipped", expected_at=str(path))
    return None


def _choose_face(name: str, faces: list[Face], mode: str, index: int | None, ambiguous_ratio: float) -> int:
    """Index (left to right) of the subject's face, or a JobError saying why there is none."""
    listing = ", ".join(f"#{i} at x={f.center[0]:.0f} y={f.center[1]:.0f} ({f.side:.0f} px)" for i, f in enumerate(faces))
    if not faces:
        raise JobError("no_face_found", f"{name}: no face found; use a photo where the subject's face is visible and at least a few dozen pixels wide")
    if index is not None:
        if index >= len(faces):
            raise JobError("face_index_out_of_range", f"{name}: subject.face_index asks for face #{index} but {len(faces)} were found: {listing}",
                           details={"faces": [f.facts() for f in faces]})
        return index
    by_area = sorted(range(len(faces)), key=lambda i: faces[i].area, reverse=True)
    largest = by_area[0]
    if mode == "auto" and len(faces) > 1 and faces[by_area[1]].area >= ambiguous_ratio * faces[largest].area:
        similar = [i for i in range(len(faces)) if faces[i].area >= ambiguous_ratio * faces[largest].area]
        similar_listing = ", ".join(f"#{i} at x={faces[i].center[0]:.0f} y={faces[i].center[1]:.0f} ({faces[i].side:.0f} px)" for i in similar)
        smaller = len(faces) - len(similar)
        raise JobError(
            "ambiguous_face",
            f"{name}: {len(similar)} faces of similar size (each at least {ambiguous_ratio:.0%} of the largest's area), so the subject "
            f"is ambiguous: {similar_listing}" + (f" ({smaller} smaller face{'s' if smaller > 1 else ''} not counted)" if smaller else "") + ". "
            f"Name the subject's face in job.toml: [subject] face_index = {{ \"{name}\" = N }} (faces counted left to right from 0), or face = \"largest\"",
            details={"faces": [f.facts() for f in faces]},
        )
    return largest


def _crop_square(face: Face, padding: float) -> tuple[tuple[float, float], float]:
    """The centre and side (pixels) of the square prepare crops around `face`: the face's side
    plus `padding` of it on each side, centred a little below the face box's centre."""
    return (face.center[0], face.center[1] + _CENTER_SHIFT_DOWN * face.side), face.side * (1.0 + 2.0 * padding)


def _refuse_if_cut_off(name: str, face: Face, shape: tuple[int, ...], padding: float, *, found_in_border: bool) -> None:
    """A JobError `face_cut_off` when the photo's edge cuts the face: its box reaches an edge
    (within _EDGE_TOLERANCE of its side), or it was found only once the photo was set in a border
    (it fills the photo to its edges). The message says how many pixels the crop needs beyond each
    edge it runs past. A face whose box is clear of the edges, but whose padded crop runs past
    them, is prepared as before: the crop's corners beyond the photo take the fill colour."""
    height, width = shape[:2]
    x1, y1, x2, y2 = face.box
    tolerance = _EDGE_TOLERANCE * face.side
    touching = [edge for edge, gap in (("left", x1), ("top", y1), ("right", width - x2), ("bottom", height - y2)) if gap <= tolerance]
    (cx, cy), side = _crop_square(face, padding)
    half = side / 2.0
    needed = {edge: math.ceil(short) for edge, short in
              (("left", half - cx), ("top", half - cy), ("right", cx + half - width), ("bottom", cy + half - height)) if short >= 0.5}
    if not needed or not (found_in_border or touching):
        return
    if found_in_border:
        what = f"the face fills the photo ({width}x{height} px) to its edges, so it is found only when the photo is set in a border"
    else:
        what = f"the face is cut off by the photo's {' and '.join(touching)} edge{'s' if len(touching) > 1 else ''} (its box reaches {'them' if len(touching) > 1 else 'it'})"
    margins = ", ".join(f"{px} px {_EDGE_WORDS[edge]}" for edge, px in needed.items())
    raise JobError(
        "face_cut_off",
        f"{name}: {what}; prepare crops {side:.0f} px around this {face.side:.0f} px face (prepare.padding = {padding:g} of its side "
        f"on each side), so the photo lacks at least {margins}: use a photo that shows the whole head with that much room "
        "around it (a smaller prepare.padding needs less)",
        details={"face": face.facts(), "photo_px": [width, height], "found_in_border": found_in_border, "edges_touched": touching,
                 "margin_needed_px": needed, "padding": padding},
    )


def _remove_background(ctx: StageContext, remover, rgb: np.ndarray, center: tuple[float, float], side: float) -> tuple[np.ndarray, dict[str, object]]:
    """The photo with everything but the person replaced by the fill colour.

    The matte is computed on the region every variant can reach (the crop square grown by
    sqrt(2) for rotations), cut from the photo as is; outside it the fill colour is used.
    """
    if not ctx.job.spec.prepare.remove_background:
        return rgb, {"method": "none", "reason": "prepare.remove_background = false"}
    if remover is None:
        staged_as = ctx.resources.background_model_path().relative_to(ctx.settings.models_dir)
        return rgb, {"method": "kept", "reason": f"no rembg model staged at <models>/{staged_as.as_posix()}"}
    half = side * math.sqrt(2.0) / 2.0
    height, width = rgb.shape[:2]
    x0, y0 = max(0, int(center[0] - half)), max(0, int(center[1] - half))
    x1, y1 = min(width, int(math.ceil(center[0] + half))), min(height, int(math.ceil(center[1] + half)))
    region = rgb[y0:y1, x0:x1]
    alpha = remover.alpha(region).astype(np.float32)[:, :, None] / 255.0
    fill = np.asarray(ctx.settings.background.fill_rgb, dtype=np.float32)
    result = np.empty_like(rgb)
    result[:] = fill.astype(np.uint8)
    result[y0:y1, x0:x1] = np.clip(np.rint(region.astype(np.float32) * alpha + fill * (1.0 - alpha)), 0, 255).astype(np.uint8)
    return result, {"method": "rembg", "model": remover.model_path.name, "region": [x0, y0, x1, y1]}


def _variants(rotations: tuple[float, ...], crops: tuple[float, ...]) -> list[tuple[str, float, float]]:
    """(name, angle in degrees counter-clockwise, scale of the crop side) for every image."""
    variants = [("base", 0.0, 1.0)]
    variants += [(f"rot{angle:+g}", float(angle), 1.0) for angle in rotations if angle != 0]
    variants += [(f"crop{round(scale * 100):d}", 0.0, float(scale)) for scale in crops if scale != 1.0]
    return variants


def _shrink(rgb: np.ndarray, keypoints: np.ndarray, center: tuple[float, float], side: float, smallest_side: float, size: int):
    """Shrink a large photo once, with area averaging, so that no warp downsamples by more
    than 2x (a bilinear warp alone would alias). Returns the photo, keypoints, centre and
    side in the shrunk coordinates."""
    factor = min(1.0, 2.0 * size / smallest_side)
    if factor == 1.0:
        return rgb, keypoints, center, side
    shrunk = cv2.resize(rgb, (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor))), interpolation=cv2.INTER_AREA)
    return shrunk, keypoints * factor, (center[0] * factor, center[1] * factor), side * factor


def _warp(rgb: np.ndarray, keypoints: np.ndarray, center: tuple[float, float], side: float, angle: float, size: int,
          fill_rgb: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Crop a `side`-pixel square around `center`, rotated by `angle` degrees
    counter-clockwise, resized to size x size. Returns the image and the keypoints mapped into it."""
    matrix = cv2.getRotationMatrix2D(center, angle, size / side)
    matrix[0, 2] += size / 2.0 - center[0]
    matrix[1, 2] += size / 2.0 - center[1]
    warped = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in fill_rgb))
    mapped = np.hstack([keypoints, np.ones((keypoints.shape[0], 1), dtype=np.float64)]) @ matrix.T
    return warped, mapped


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(name).stem)[:40] or "photo"
