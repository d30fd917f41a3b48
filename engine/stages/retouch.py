"""Stage retouch (kind `retouch`): region-masked inpainting sweeps on one portrait, every variant
pasted into the original photo at its native resolution and measured.

1. The subject's face (prepare's choice) on the original photo; its 106 landmarks, cross-checked
   (engine.identity.landmarks); the region masks (engine.identity.regions), or a PNG from the job folder per region
   ([retouch.masks]; white = edit, same size as the photo; protected features still cut out).
2. Region sets: each applicable region alone, and (`combine`) all of them together. For each set,
   strength and seed: the face's square neighbourhood is inpainted at the model's size, the result
   scaled back to the photo's pixels and pasted through the region's feathered alpha. `parallel`:
   each region is inpainted from the original and the pastes combined (a combination is then made
   of the single-region variants, no model call); `sequential`: one region after the other, each
   from the last one's result. Pixels outside the alphas are the original's bytes, and each
   variant records how many are not (0).
3. Each variant is measured against the original (engine.measure.texture: ArcFace drift with the
   original's own keypoints, texture kept, ΔE2000, landmark shift; and, reported only, the
   second identity model's distance) and accepted or rejected ([retouch.accept]) with its reasons.

Outputs (engine.layout): retouch/variants/*.png (signed with lab keys), retouch/masks/ (each
region's mask and alpha, and an overlay), retouch/grids/<set>.png (strength rows x seed columns),
retouch/retouch.json and .csv. Finished variants of an interrupted sweep wait in
retouch_progress/ (scratch): a resumed run skips every (region set, strength) whose seeds were all
finished, and redoes a batch it finds in part, so its variants equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import cv2
import numpy as np

from engine import layout
from engine.context import StageContext
from engine.diffusion.sampling import drift_label, inpaint_in_photo, png_text, square_around
from engine.errors import JobError
from engine.identity.faces import Face, drift
from engine.faults import pause_point
from engine.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from engine.images import load_photo, png_bytes, read_rgb
from engine.measure.texture import composite, landmark_shift, measure_edit
from engine.identity.regions import REGIONS, RegionMask, feathered, protected_features, region_masks
from engine.schema import to_plain

NAME = "retouch"
VERSION = 2  # 2: each region's record has its bbox (the report's before/after close-ups)
OUTPUTS = (layout.RETOUCH_DIR,)
SCRATCH = (layout.RETOUCH_PROGRESS_DIR,)
MODELS = ("faces", "landmarks", "inpaint", "identity2")  # every model role it may use (engine.inventory checks them); models(ctx): this job's
CROP_MARGIN = 0.35  # IOD around the masks' extent: the model sees the skin around what it repaints
GRID_CELL = 192  # px, the side of a grid cell
OVERLAY_COLOURS = dict(zip(REGIONS, ((230, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40)), strict=True))  # red, green, blue, yellow in REGIONS' order


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {"retouch": to_plain(ctx.job.spec.retouch), "model_size": _model_size(ctx), "input": to_plain(ctx.settings.input),
            "content_signer": ctx.resources.trust_facts().get("content_signer")}


def _model_size(ctx: StageContext) -> int:
    return ctx.model_side(ctx.job.spec.retouch.resolution)


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.retouch
    faces, landmarks, pipe = ctx.use("faces"), ctx.use("landmarks"), ctx.use("inpaint")
    name = ctx.job.spec.subject.photos[0]
    original = load_photo(ctx.job.photos[0], name, ctx.settings.input.max_pixels, ctx.settings.background.fill_rgb).rgb
    chosen = layout.chosen_face(ctx.job_dir)
    face = Face(box=tuple(chosen["box"]), score=chosen["score"], keypoints=np.asarray(chosen["keypoints"], dtype=np.float32))
    marks = landmarks.find(original, face)
    masks = _overridden(ctx, region_masks(original, marks, spec.regions, min_skin=spec.min_skin), marks, original.shape[:2])
    if marks.uncertain:
        ctx.log.warning("landmarks_uncertain", **marks.facts())
    ctx.audit.event("retouch_masks", landmarks=marks.facts(), regions=[m.facts() for m in masks.values()])
    for folder in (layout.RETOUCH_MASKS_DIR, layout.RETOUCH_VARIANTS_DIR, layout.RETOUCH_GRIDS_DIR, layout.RETOUCH_PROGRESS_DIR):
        ctx.path(folder).mkdir(parents=True, exist_ok=True)
    _write_masks(ctx, original, masks)
    applicable = [region for region in spec.regions if masks[region].applicable]
    sets = [(region,) for region in applicable] + ([tuple(applicable)] if spec.combine and len(applicable) > 1 else [])
    reference = faces.embed(original, face.keypoints)
    second = ctx.use("identity2")  # None without dlib: the distances are then null, and retouch.json says why
    second_reference = second.describe(original, face.box) if second is not None else None
    sweep = Sweep(ctx, pipe, original, face, marks, masks, reference, _crop_box(masks, applicable, marks.iod, original.shape[:2]), _model_size(ctx),
                  second, second_reference)
    rows: list[dict[str, Any]] = []
    for region_set in sets:
        for strength in spec.strengths:
            rows += sweep.variants(region_set, strength)
    for row in rows:  # the finished sweep: out of the scratch folder, into the outputs
        os.replace(ctx.path(f"{layout.RETOUCH_PROGRESS_DIR}/{os.path.basename(row['file'])}"), ctx.path(row["file"]))
    _write_grids(ctx, sets, rows, sweep.crop)
    _write_reports(ctx, marks, masks, sets, rows, sweep.resumed)


class Sweep:
    """The variants of one job: made (or, after an interruption, read back), measured, recorded."""

    def __init__(self, ctx: StageContext, pipe: Any, original: np.ndarray, face: Face, marks: Any, masks: dict[str, RegionMask],
                 reference: np.ndarray, crop: tuple[int, int, int, int], size: int, second: Any = None,
                 second_reference: np.ndarray | None = None) -> None:
        self.ctx, self.pipe, self.original, self.face, self.marks, self.masks = ctx, pipe, original, face, marks, masks
        self.reference, self.crop, self.size = reference, crop, size
        self.second, self.second_reference = second, second_reference  # engine.identity.second, on the same face box
        self.spec = ctx.job.spec.retouch
        self.limits = self.spec.accept  # [retouch.accept] is engine.measure.texture.AcceptLimits
        self.images: dict[tuple[tuple[str, ...], float, int], np.ndarray] = {}  # variants made or read back, for combinations
        self.resumed = 0
        self.count = 0

    def variants(self, region_set: tuple[str, ...], strength: float) -> list[dict[str, Any]]:
        """Every seed of (region_set, strength), in one batched call; read back instead when an
        interrupted run finished all of them. A batch is redone whole, never in part: CPU kernels
        depend on the batch size (FINDINGS), and a resumed job must equal an uninterrupted one."""
        done = [self._finished(region_set, strength, seed) for seed in self.spec.seeds]
        if all(row is not None for row in done):
            self.resumed += len(done)
            return done
        seeds = list(self.spec.seeds)
        return [self._keep(region_set, strength, seed, rgb) for seed, rgb in zip(seeds, self._make(region_set, strength, seeds))]

    def _make(self, region_set: tuple[str, ...], strength: float, seeds: list[int]) -> list[np.ndarray]:
        if len(region_set) > 1 and self.spec.compositing == "parallel":
            out = []
            for seed in seeds:  # each region's variant was made from the original: their pasted pixels, together
                result = self.original.copy()
                for region in region_set:
                    support = self.masks[region].alpha > 0  # where two feathered edges meet, the later region's pixels stand
                    result[support] = self.images[((region,), strength, seed)][support]
                out.append(result)
            return out
        results = [self.original] * len(seeds)
        for region in region_set:
            if len(set(id(r) for r in results)) == 1:  # all from the same picture: one batched call
                edits = self._inpaint(results[0], region, strength, seeds)
            else:
                edits = [self._inpaint(result, region, strength, [seed])[0] for result, seed in zip(results, seeds)]
            results = [composite(result, edit, self.masks[region].alpha).rgb for result, edit in zip(results, edits)]
        return results

    def _inpaint(self, picture: np.ndarray, region: str, strength: float, seeds: list[int]) -> list[np.ndarray]:
        """The crop of `picture` inpainted at the model's size inside `region`, scaled back into a full-size copy."""
        where = f"retouch {region} strength {strength}"
        self.ctx.check_stop(where)
        return inpaint_in_photo(self.pipe, picture, self.masks[region].mask, self.crop, self.size, self.spec.prompt, self.spec.negative_prompt,
                                seeds, steps=self.spec.steps, guidance=self.spec.guidance, strength=strength,
                                on_step=lambda: self.ctx.check_stop(where))

    def _keep(self, region_set: tuple[str, ...], strength: float, seed: int, rgb: np.ndarray) -> dict[str, Any]:
        ctx = self.ctx
        mask = np.zeros(self.original.shape[:2], dtype=bool)
        support = np.zeros(self.original.shape[:2], dtype=bool)
        for region in region_set:
            mask |= self.masks[region].mask
            support |= self.masks[region].alpha > 0
        changed_outside = int(np.any(rgb[~support] != self.original[~support], axis=-1).sum())
        moved = drift(self.reference, ctx.use("faces").embed(rgb, self.face.keypoints))
        shift = landmark_shift(self.marks.points, ctx.use("landmarks").find(rgb, self.face).points, self.marks.iod)
        measures = measure_edit(self.original, rgb, mask, self.marks.iod, drift=moved, landmark_shift=shift)
        accepted, reasons = self.limits.judge(measures)
        second = None
        if self.second is not None and self.second_reference is not None:
            from engine.identity import second as identity2
            second = round(identity2.distance(self.second_reference, self.second.describe(rgb, self.face.box)), 6)
        set_name = "+".join(region_set)
        file = f"{layout.RETOUCH_VARIANTS_DIR}/{set_name}_s{strength:.3f}_seed{seed}_drift_{drift_label(round(moved, 6))}.png"
        facts = {"region_set": list(region_set), "strength": strength, "seed": seed, "steps": self.spec.steps,
                 "denoising_steps": self.spec.denoising_steps(strength), "compositing": self.spec.compositing, **measures.facts(),
                 "identity2_distance": second, "accepted": accepted, "reasons": reasons, "changed_outside_mask_px": changed_outside}
        scratch = f"{layout.RETOUCH_PROGRESS_DIR}/{os.path.basename(file)}"
        credentials = ctx.write_generated_image(scratch, rgb, png_text(**facts, demo=ctx.demo, models=ctx.models_used, job_id=ctx.job_id),
                                                {"stage": NAME, **facts})
        row = {**facts, "file": file, "sha256": sha256_file(ctx.path(scratch)), "credentials": credentials}
        # Recorded in the audit log: a resume reads back only this very record (StageContext.read_recorded).
        ctx.write_recorded("scratch_written", {_record(region_set, strength, seed):
                                               (json.dumps(row, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()},
                           stage=NAME)
        self.images[(region_set, strength, seed)] = rgb
        self.count += 1
        ctx.progress("retouch_variant", region_set=set_name, strength=strength, seed=seed, accepted=accepted, drift=moved,
                      texture_ratio=measures.texture_ratio)
        pause_point(f"retouch:variant:{self.count}")
        return row

    def _finished(self, region_set: tuple[str, ...], strength: float, seed: int) -> dict[str, Any] | None:
        """A variant an interrupted run of this very stage finished (its record as the audit log
        recorded it, and its image as the record says)."""
        record = self.ctx.read_recorded(_record(region_set, strength, seed), stage=NAME)
        if record is None:
            return None
        row = json.loads(record.decode("utf-8"))
        image = self.ctx.path(f"{layout.RETOUCH_PROGRESS_DIR}/{os.path.basename(row['file'])}")
        if not image.is_file() or sha256_file(image) != row["sha256"]:
            return None
        self.images[(region_set, strength, seed)] = read_rgb(image)
        return row


def _record(region_set: tuple[str, ...], strength: float, seed: int) -> str:
    return f"{layout.RETOUCH_PROGRESS_DIR}/{'+'.join(region_set)}_s{strength:.3f}_seed{seed}.json"


def _overridden(ctx: StageContext, masks: dict[str, RegionMask], marks: Any, shape: tuple[int, int]) -> dict[str, RegionMask]:
    """[retouch.masks]: a region's mask from a PNG in the job folder (white = edit), protected features still cut out."""
    if not ctx.job.spec.retouch.masks:
        return masks
    from PIL import Image

    protected = protected_features(marks, shape, marks.iod)
    out = dict(masks)
    for region, file in ctx.job.spec.retouch.masks:
        path = ctx.job.folder / file
        key = f"job.toml: retouch.masks.{region}"
        if not path.is_file():
            raise JobError("invalid_job", f"{key}: {file!r} is not a file in the job folder")
        try:
            with Image.open(path) as image:
                grey = np.asarray(image.convert("L"))
        except OSError as exc:
            raise JobError("invalid_job", f"{key}: {file!r} is not a readable PNG ({exc})") from None
        if grey.shape != shape:
            raise JobError("invalid_job", f"{key}: {file!r} is {grey.shape[1]}x{grey.shape[0]} px, the photo {shape[1]}x{shape[0]}: a mask has the photo's size")
        drawn = grey >= 128
        mask = drawn & ~protected
        out[region] = RegionMask(name=region, mask=mask, alpha=feathered(mask, marks.iod), drawn_px=int(drawn.sum()),
                                 kept=float(mask.sum()) / max(1, int(drawn.sum())), applicable=bool(mask.any()),
                                 reason="" if mask.any() else f"the mask {file} is empty once the protected features are cut out")
    return out


def _crop_box(masks: dict[str, RegionMask], regions: list[str], iod: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square around every mask's support (plus CROP_MARGIN IOD), inside the photo."""
    support = np.zeros(shape, dtype=bool)
    for region in regions:
        support |= masks[region].alpha > 0
    return square_around(support, CROP_MARGIN * iod, shape)


def _write_masks(ctx: StageContext, original: np.ndarray, masks: dict[str, RegionMask]) -> None:
    overlay = original.astype(np.float64)
    for region, mask in masks.items():
        atomic_write_bytes(ctx.path(f"{layout.RETOUCH_MASKS_DIR}/{region}_mask.png"), png_bytes(np.repeat((mask.mask * 255).astype(np.uint8)[..., None], 3, axis=2)))
        atomic_write_bytes(ctx.path(f"{layout.RETOUCH_MASKS_DIR}/{region}_alpha.png"),
                           png_bytes(np.repeat(np.rint(mask.alpha * 255).astype(np.uint8)[..., None], 3, axis=2)))
        weight = mask.alpha[..., None] * 0.5
        overlay = overlay * (1 - weight) + np.array(OVERLAY_COLOURS.get(region, (255, 0, 255)), dtype=np.float64) * weight
    atomic_write_bytes(ctx.path(layout.RETOUCH_OVERLAY), png_bytes(np.clip(np.rint(overlay), 0, 255).astype(np.uint8)))


def _write_grids(ctx: StageContext, sets: list[tuple[str, ...]], rows: list[dict[str, Any]], crop: tuple[int, int, int, int]) -> None:
    """One grid per region set: strength rows x seed columns, the face's neighbourhood of each
    variant with its drift, texture kept and ΔE under it (red frame: rejected)."""
    spec = ctx.job.spec.retouch
    x0, y0, x1, y1 = crop
    label = 44
    for region_set in sets:
        grid = np.full((len(spec.strengths) * (GRID_CELL + label), len(spec.seeds) * GRID_CELL, 3), 255, dtype=np.uint8)
        for row in rows:
            if tuple(row["region_set"]) != region_set:
                continue
            r, c = spec.strengths.index(row["strength"]), spec.seeds.index(row["seed"])
            cell = cv2.resize(read_rgb(ctx.path(row["file"]))[y0:y1, x0:x1], (GRID_CELL, GRID_CELL), interpolation=cv2.INTER_AREA)
            if not row["accepted"]:
                cv2.rectangle(cell, (0, 0), (GRID_CELL - 1, GRID_CELL - 1), (220, 30, 30), 3)
            top = r * (GRID_CELL + label)
            grid[top:top + GRID_CELL, c * GRID_CELL:(c + 1) * GRID_CELL] = cell
            texts = (f"s {row['strength']:g} seed {row['seed']} {'ok' if row['accepted'] else 'REJECTED'}",
                     f"drift {_fmt(row['drift'])} tex {_fmt(row['texture_ratio'], 2)} dE {_fmt(row['delta_e'], 2)}")
            for line, text in enumerate(texts):
                cv2.putText(grid, text, (c * GRID_CELL + 4, top + GRID_CELL + 16 + 18 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        atomic_write_bytes(ctx.path(layout.retouch_grid('+'.join(region_set))), png_bytes(grid))


def _second_model_note() -> dict[str, Any]:
    """What identity2_distance is (engine.identity.second: dlib's descriptor on the same face box as
    ArcFace, reported only: acceptance is judged on ArcFace drift and the guards)."""
    from engine.identity import second as identity2
    files, reason = identity2.locate()
    note = {"model": identity2.MODEL_NAME, "distance": "Euclidean distance of 128-D descriptors to the original's; <= "
            f"{identity2.TOLERANCE} same person, <= {identity2.STRICT_TOLERANCE} strictly", "used_for_acceptance": False}
    return {**note, "available": files is not None, **({"reason": reason} if files is None else {})}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _write_reports(ctx: StageContext, marks: Any, masks: dict[str, RegionMask], sets: list[tuple[str, ...]], rows: list[dict[str, Any]],
                   resumed: int) -> None:
    spec = ctx.job.spec.retouch
    report = {
        "job_id": ctx.job_id, "subject": ctx.job.subject, "photo": ctx.job.spec.subject.photos[0], "demo": ctx.demo,
        "note": "demo model: random weights, the variants are noise" if ctx.demo else "",
        "landmarks": marks.facts(), "regions": [m.facts() for m in masks.values()], "region_sets": ["+".join(s) for s in sets],
        "strengths": list(spec.strengths), "seeds": list(spec.seeds), "compositing": spec.compositing, "accept": to_plain(spec.accept),
        "variants": rows, "accepted": sum(row["accepted"] for row in rows), "rejected": sum(not row["accepted"] for row in rows),
        "identity2": _second_model_note(),
    }
    atomic_write_json(ctx.path(layout.RETOUCH_INFO), report)
    columns = ["demo", "region_set", "strength", "seed", "denoising_steps", "drift", "identity2_distance", "texture_ratio", "laplacian_ratio", "texture_measurable",
               "delta_e", "landmark_shift_iod", "accepted", "reasons", "changed_outside_mask_px", "file", "credentials"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns}
                        | {"demo": str(ctx.demo).lower(), "region_set": "+".join(row["region_set"]), "reasons": "; ".join(row["reasons"])})
    atomic_write_text(ctx.path(layout.RETOUCH_CSV), buffer.getvalue())
    ctx.audit.event("retouch_swept", variants=len(rows), accepted=report["accepted"], rejected=report["rejected"], resumed_variants=resumed,
                    landmarks_uncertain=marks.uncertain)
    ctx.log.info("retouch_swept", variants=len(rows), accepted=report["accepted"], resumed_variants=resumed)
