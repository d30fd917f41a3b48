"""Stage restore (kind `restore`): a damaged portrait inpainted inside its damage mask, stopped
where restoring turns into inventing a face, and scored by identity.

1. The photo and its mask ([restore] mask: white = damaged, engine.identity.coverage.load_mask). The face
   and its landmarks are found on a TELEA pre-filled copy (engine.identity.coverage.prefill; never an
   output: the audit says the landmarks came from it).
2. Coverage (engine.identity.coverage): the masked share of the face and of its features. Above a refuse
   limit the job fails with `restore_mask_too_large` and the coverages in error.json, or, with
   on_refuse = "classical", delivers the TELEA fill alone, labelled non-generative. Above a flag
   limit it goes on, flagged.
3. Restoration: the inpainting model (models.inpaint), the seeds batched, on the square around the
   mask at the model's size; each variant pasted back through the mask grown by grow_px, so every
   pixel outside it is the photo's own byte (recorded per variant).
4. Identity: with references, each variant's ArcFace drift to them beside the damaged photo's own
   (a variant farther than that plus drift_margin is flagged); without, `identity_unverified`.
   Always the seed spread, the mean drift between the variants: where the visible pixels pin the
   identity down, the variants agree; where they do not, the model invents, differently per seed.

Outputs (engine.layout): restore/variants/seed_<n>.png (signed with lab keys), restore/mask.png,
restore/overlay.png, restore/coverage.json, restore/restore.json and .csv.
"""

from __future__ import annotations

import csv
import io
from itertools import combinations
from typing import Any

import cv2
import numpy as np

from engine import layout
from engine.context import StageContext
from engine.identity.coverage import CoverageLimits, coverage, keyed_mask, load_mask, prefill
from engine.diffusion.sampling import inpaint_in_photo, png_text, square_around
from engine.errors import JobError
from engine.identity.faces import drift, normalise
from engine.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from engine.images import load_photo, png_bytes
from engine.schema import to_plain

NAME = "restore"
VERSION = 2  # 2: restore.json records the damage mask's box (the report's before/after close-ups)
OUTPUTS = (layout.RESTORE_DIR,)
MODELS = ("faces", "landmarks", "inpaint", "identity2")  # every model role it may use (engine.inventory checks them); models(ctx): this job's
CROP_MARGIN = 0.5  # IOD around the mask: the model sees the face it repairs


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {"restore": to_plain(ctx.job.spec.restore), "model_size": ctx.model_side(ctx.job.spec.restore.resolution),
            "input": to_plain(ctx.settings.input), "content_signer": ctx.resources.trust_facts().get("content_signer")}


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.restore
    faces, landmarks = ctx.use("faces"), ctx.use("landmarks")
    name = ctx.job.spec.subject.photos[0]
    photo = load_photo(ctx.job.photos[0], name, ctx.settings.input.max_pixels, ctx.settings.background.fill_rgb).rgb
    if spec.mask:
        mask = load_mask(ctx.job.folder / spec.mask, photo.shape[:2], "job.toml: restore.mask")
    else:
        mask = keyed_mask(ctx.job.folder / spec.painted, photo, tuple(spec.key), spec.key_tolerance, "job.toml: restore.painted")
    filled = prefill(photo, mask)
    found = faces.detect(filled)
    if not found:
        raise JobError("no_face_found", f"{name}: no face found, even with the damage ({spec.mask or spec.painted}) pre-filled")
    face = max(found, key=lambda f: f.area)
    marks = landmarks.find(filled, face)
    covered = coverage(mask, marks)
    limits = CoverageLimits(spec.flag_face, spec.flag_feature, spec.flag_any_feature, spec.refuse_face, spec.refuse_feature)
    verdict, reasons = covered.verdict(limits)
    ctx.path(layout.RESTORE_VARIANTS_DIR).mkdir(parents=True, exist_ok=True)
    facts = {"verdict": verdict, "reasons": reasons, **covered.facts(), "limits": to_plain(limits), "landmarks": marks.facts(),
             "landmarks_from": "the TELEA pre-filled copy of the photo (never an output)"}
    atomic_write_json(ctx.path(layout.RESTORE_COVERAGE), facts)
    ctx.audit.event("restore_coverage", **facts)
    _write_mask(ctx, photo, mask)
    if verdict == "refuse":
        if spec.on_refuse == "fail":
            raise JobError("restore_mask_too_large", f"the damage mask {spec.mask or spec.painted} hides too much of the face to restore it without inventing one: "
                           + "; ".join(reasons), details={"coverage": covered.facts(), "limits": to_plain(limits)})
        atomic_write_bytes(ctx.path(layout.RESTORE_CLASSICAL), png_bytes(filled, {"method": "OpenCV TELEA inpainting", "generative": "false",
                                                                                   "note": "refused for generative restoration: " + "; ".join(reasons)}))
        _write_reports(ctx, facts, [], None, None, _box_of(mask), classical=True)
        ctx.progress("restore_verdict", verdict="refused_classical", face_coverage=covered.face)
        return
    pipe = ctx.use("inpaint")
    size = ctx.model_side(spec.resolution)
    grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * spec.grow_px + 1,) * 2)).astype(bool) if spec.grow_px else mask
    box = square_around(grown, CROP_MARGIN * marks.iod, photo.shape[:2])
    where = "restore"
    ctx.check_stop(where)
    made = inpaint_in_photo(pipe, photo, grown, box, size, spec.prompt, spec.negative_prompt, list(spec.seeds), steps=spec.steps,
                            guidance=spec.guidance, strength=spec.strength, on_step=lambda: ctx.check_stop(where))
    reference = _reference(ctx, faces) if spec.references else None
    baseline = drift(reference, faces.embed(photo, face.keypoints)) if reference is not None else None
    second = ctx.use("identity2") if spec.references else None  # reported beside ArcFace's drift, never judged
    second_reference = _second_reference(ctx, faces, second) if second is not None else None
    rows, embeddings = [], []
    for seed, edit in zip(spec.seeds, made):
        variant = np.where(grown[..., None], edit, photo)  # outside the grown mask: the photo's own bytes
        embedding = faces.embed(variant, face.keypoints)
        embeddings.append(embedding)
        moved = drift(reference, embedding) if reference is not None else None
        distance = None
        if second_reference is not None:
            from engine.identity import second as identity2
            distance = round(identity2.distance(second_reference, second.describe(variant, face.box)), 6)
        row = {"seed": seed, "drift_to_references": None if moved is None else round(moved, 6), "identity2_distance": distance,
               "farther_than_damaged": None if moved is None else bool(moved > baseline + spec.drift_margin),
               "changed_outside_mask_px": int(np.any(variant[~grown] != photo[~grown], axis=-1).sum()),
               "file": f"{layout.RESTORE_VARIANTS_DIR}/seed_{seed}.png"}
        row["credentials"] = ctx.write_generated_image(row["file"], variant, png_text(**row, verdict=verdict, demo=ctx.demo, models=ctx.models_used,
                                                                                       job_id=ctx.job_id), {"stage": NAME, "verdict": verdict, **row})
        rows.append(row)
        ctx.progress("restore_variant", seed=seed, drift=moved, verdict=verdict)
    ctx.progress("restore_verdict", verdict=verdict, face_coverage=covered.face)
    spread = float(np.mean([drift(a, b) for a, b in combinations(embeddings, 2)])) if len(embeddings) > 1 else None
    _write_reports(ctx, facts, rows, baseline, spread, _box_of(grown))


def _reference(ctx: StageContext, faces: Any) -> np.ndarray:
    """The identity reference: the normalised mean ArcFace embedding of the references' largest faces."""
    vectors = []
    for name in ctx.job.spec.restore.references:
        path = ctx.job.folder / name
        if not path.is_file():
            raise JobError("invalid_job", f"job.toml: restore.references: {name!r} is not a file in the job folder")
        rgb = load_photo(path, name, ctx.settings.input.max_pixels, ctx.settings.background.fill_rgb).rgb
        found = faces.detect(rgb)
        if not found:
            raise JobError("no_face_found", f"{name} (restore.references): no face found")
        face = max(found, key=lambda f: f.area)
        vectors.append(faces.embed(rgb, face.keypoints))
    return normalise(np.mean(vectors, axis=0))


def _second_reference(ctx: StageContext, faces: Any, model: Any) -> np.ndarray | None:
    """The references' mean dlib descriptor (engine.identity.second), on each one's largest SCRFD face."""
    descriptors = []
    for name in ctx.job.spec.restore.references:
        rgb = load_photo(ctx.job.folder / name, name, ctx.settings.input.max_pixels, ctx.settings.background.fill_rgb).rgb
        descriptor = model.describe_largest(faces, rgb)
        if descriptor is not None:
            descriptors.append(descriptor)
    return np.mean(descriptors, axis=0) if descriptors else None


def _write_mask(ctx: StageContext, photo: np.ndarray, mask: np.ndarray) -> None:
    atomic_write_bytes(ctx.path(layout.RESTORE_MASK), png_bytes(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)))
    overlay = photo.copy()
    overlay[mask] = (0.5 * overlay[mask] + 0.5 * np.array((230, 40, 200))).astype(np.uint8)
    atomic_write_bytes(ctx.path(layout.RESTORE_OVERLAY), png_bytes(overlay))


def _box_of(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1) of the pixels the restoration may change: where a reviewer looks."""
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _write_reports(ctx: StageContext, coverage_facts: dict[str, Any], rows: list[dict[str, Any]], baseline: float | None, spread: float | None,
                   mask_box: list[int] | None, classical: bool = False) -> None:
    spec = ctx.job.spec.restore
    identity = ("identity_unverified: no undamaged reference photo of the person was given (restore.references)" if not spec.references
                else f"ArcFace drift to the references: the damaged photo {baseline:.4f}" if baseline is not None else "")
    report = {
        "job_id": ctx.job_id, "subject": ctx.job.subject, "photo": ctx.job.spec.subject.photos[0], "mask": spec.mask or spec.painted,
        "mask_form": "mask" if spec.mask else f"painted in {list(spec.key)}", "mask_box": mask_box, "demo": ctx.demo,
        "note": "demo model: random weights, the variants are noise" if ctx.demo else "",
        "verdict": "refused_classical" if classical else coverage_facts["verdict"], "reasons": coverage_facts["reasons"],
        "coverage": {k: coverage_facts[k] for k in ("face_coverage", "feature_coverage", "features")},
        "generative": not classical, "classical_fill": layout.RESTORE_CLASSICAL if classical else None,
        "references": list(spec.references), "identity": identity, "damaged_drift_to_references": None if baseline is None else round(baseline, 6),
        "seed_spread": None if spread is None else round(spread, 6),
        "seed_spread_note": "mean ArcFace drift between the variants: low where the visible pixels fix the identity, high where the model invents it",
        "variants": rows,
    }
    atomic_write_json(ctx.path(layout.RESTORE_INFO), report)
    buffer = io.StringIO()
    columns = ["demo", "verdict", "seed", "drift_to_references", "identity2_distance", "farther_than_damaged", "changed_outside_mask_px", "file",
               "credentials"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns} | {"demo": str(ctx.demo).lower(), "verdict": report["verdict"]})
    atomic_write_text(ctx.path(layout.RESTORE_CSV), buffer.getvalue())
    ctx.audit.event("restored", verdict=report["verdict"], variants=len(rows), seed_spread=report["seed_spread"],
                    damaged_drift_to_references=report["damaged_drift_to_references"])
