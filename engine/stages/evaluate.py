"""Stage evaluate (kind `evaluate`): prompt x seed x training group against a control, measured
like an experiment.

Every cell (group, prompt, seed) is rendered at the same fixed seeds, detected, embedded and
scored: ArcFace drift to the subject's reference, the second identity model's distance (reported
beside it), face found. The control group renders with no LoRA loaded at all (the base model
exactly; a LoRA at weight 0 gives the same bytes). Each group's LoRA comes from the train stage
(the job's LoRA, its snapshot at a phase's exit, a photo-subset group's own LoRA) or from the job
folder (a .safetensors file, checked against the sha256 job.toml gives). Cells without a face are
counted, never scored (engine.measure.evalstats).

Outputs (engine.layout): evaluate/cells/<group>/*.png (PNG text; C2PA with lab keys),
evaluate/sheets/<group>.png (prompt rows x seed columns), evaluate/evaluate.json and .csv (one row
per cell). The report draws the charts from evaluate.json. Seeds are rendered in fixed batches;
the cells of an interrupted grid wait in evaluate_progress/ (scratch): a resumed run reads back
every batch that was finished and redoes one it finds in part (CPU kernels depend on the batch
size), so its cells equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import layout

from engine.measure import evalstats

from engine.identity import faceid
from engine.context import StageContext
from engine.diffusion.sampling import drift_label, identity_lora, png_text, render
from engine.errors import JobError
from engine.identity.faces import score_face
from engine.faults import pause_point
from engine.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from engine.images import png_bytes, read_rgb
from engine.kinds.evaluate import EvaluateGroup, evaluate_prompts
from engine.kinds.sections import CONTROL_GROUP
from engine.schema import to_plain

NAME = "evaluate"
VERSION = 1
OUTPUTS = (layout.EVALUATE_DIR,)
SCRATCH = (layout.EVALUATE_PROGRESS_DIR,)
MODELS = ("base", "faces", "identity2", "faceid")  # every model role it may use (engine.inventory checks them); models(ctx): this job's
SHEET_CELL = 128  # px, the side of a contact sheet's cell
CSV_COLUMNS = ["demo", "group", "method", "source", "lora_weight", "faceid_scale", "prompt_index", "prompt", "seed", "face_found", "drift", "locked", "identity2_distance",
               "file", "sha256", "credentials"]


def models(ctx: StageContext) -> tuple[str, ...]:
    faceid = any(group.uses_faceid for group in ctx.job.spec.evaluate.group)
    return ("base", "faces", "identity2") + (("faceid",) if faceid else ())


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {"evaluate": to_plain(ctx.job.spec.evaluate), "prompts": evaluate_prompts(ctx.job.spec), "negative_prompt": ctx.settings.render.negative_prompt,
            "resolution": ctx.training_resolution, "content_signer": ctx.resources.trust_facts().get("content_signer")}


@dataclass(frozen=True)
class Column:
    """One group of the grid as rendered: its name, where its LoRA is (None: none), the weight, and
    the FaceID scale (None: no FaceID). The control has neither."""

    name: str
    source: str
    lora: Path | None
    weight: float
    index: int | None = None  # its place in evaluate.group (None: the control)
    faceid_scale: float | None = None
    method: str = CONTROL_GROUP

    def facts(self, ctx: StageContext) -> dict[str, Any]:
        lora = None if self.lora is None else (self.lora if self.lora.is_file() else self.lora / layout.LORA_WEIGHTS)
        out = {"name": self.name, "method": self.method, "source": self.source, "lora_weight": self.weight if lora is not None else None,
               "lora_file": None if lora is None else _relative(ctx, lora), "lora_sha256": None if lora is None else sha256_file(lora)}
        if self.faceid_scale is not None:  # what FaceID was conditioned on, and at which scale (the adapter's hashes: models_used)
            out["faceid"] = {"scale": self.faceid_scale, "embedding": layout.REFERENCE_FILE, "embedding_sha256": sha256_file(ctx.path(layout.REFERENCE_FILE))}
        return out | {"extra_training_steps": _extra_steps(ctx, self)}


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.evaluate
    pipe, faces = ctx.use("base"), ctx.use("faces")
    columns = _columns(ctx)
    for column in columns:
        _check_brought_file(ctx, column)
    reference = layout.reference_embedding(ctx.job_dir)
    second = ctx.use("identity2")  # None without dlib: the distances are then null, and evaluate.json says why
    second_reference = None
    if second is not None:
        from engine.identity import second as identity2
        second_reference = identity2.reference_descriptor(ctx.job_dir, second, faces)
    if any(column.faceid_scale is not None for column in columns):
        index = next(column.index for column in columns if column.faceid_scale is not None)
        faceid.check_job_face_pack(faces, ctx.demo, f"evaluate.group[{index}].method")
    grid = Grid(ctx, pipe, faces, reference, second, second_reference)
    for folder in (layout.EVALUATE_PROGRESS_DIR, layout.EVALUATE_SHEETS_DIR):
        ctx.path(folder).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for column in columns:
        with _conditioning(ctx, pipe, column, reference) as embeds:
            for index, prompt in enumerate(evaluate_prompts(ctx.job.spec)):
                for batch in _batches(spec.seeds, spec.batch_size):
                    rows += grid.cells(column, index, prompt, batch, embeds)
    for row in rows:  # the finished grid: out of the scratch folder, into the outputs
        target = ctx.path(row["file"])
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ctx.path(_scratch_image(row["file"])), target)
    _write_sheets(ctx, columns, rows)
    _write_reports(ctx, columns, rows, grid.resumed)


def _batches(seeds: tuple[int, ...], size: int) -> list[list[int]]:
    return [list(seeds[i:i + size]) for i in range(0, len(seeds), size)]


def _columns(ctx: StageContext) -> list[Column]:
    spec = ctx.job.spec.evaluate
    columns = [Column(CONTROL_GROUP, "control: no LoRA", None, 0.0)] if spec.control else []
    for index, group in enumerate(spec.group):
        columns.append(Column(group.name, group.source, _lora_path(ctx, group) if group.uses_lora else None, group.weight, index,
                              group.faceid_scale if group.uses_faceid else None, group.method))
    return columns


def _lora_path(ctx: StageContext, group: EvaluateGroup) -> Path:
    if group.file:
        return ctx.job.folder / group.file
    if group.photos:
        return ctx.path(layout.group_lora_dir(group.name))
    return ctx.path(layout.LORA_DIR if group.phase == "final" else layout.phase_lora_dir(group.phase))


def _check_brought_file(ctx: StageContext, column: Column) -> None:
    """A LoRA brought in the folder is used only with the sha256 job.toml gives for it."""
    if column.index is None:
        return
    group = ctx.job.spec.evaluate.group[column.index]
    if group.file and sha256_file(column.lora) != group.sha256:
        raise JobError("invalid_job", f"job.toml: evaluate.group[{column.index}].sha256: {group.file!r} has sha256 {sha256_file(column.lora)}, "
                                      f"not {group.sha256}; bring the file job.toml names, or correct the hash")


@contextlib.contextmanager
def _conditioning(ctx: StageContext, pipe: Any, column: Column, reference: np.ndarray):
    """The column's LoRA (at its weight) and FaceID adapter (at its scale) in the shared pipeline
    for the block; yields the FaceID conditioning for `render` (None without FaceID). The control
    loads neither: the base model exactly."""
    with contextlib.ExitStack() as stack:
        switch = None
        if column.lora is not None:
            try:
                switch = stack.enter_context(identity_lora(pipe, column.lora))  # a file that loads no layer fails here
                switch.weight(column.weight)
            except Exception as exc:  # noqa: BLE001 - diffusers' loader on a file from the folder fails many ways (IndexError, KeyError, ValueError...)
                raise JobError("invalid_job", f"job.toml: evaluate.group[{column.index}]: the LoRA {_relative(ctx, column.lora)} cannot be loaded into "
                                              f"the base model ({str(exc)[:300]}); a group's file must be a LoRA for this base model (diffusers or kohya format)") from None
        adapter = None if column.faceid_scale is None else stack.enter_context(faceid.faceid_adapter(pipe, ctx.use("faceid")))
        adapters = faceid.IdentityAdapters(pipe, switch, adapter, reference)
        adapters.set(column.weight, column.faceid_scale or 0.0)
        yield adapters.embeds(ctx.job.spec.evaluate.guidance)


class Grid:
    """The cells of one job: rendered (or, after an interruption, read back), scored, recorded."""

    def __init__(self, ctx: StageContext, pipe: Any, faces: Any, reference: np.ndarray, second: Any, second_reference: np.ndarray | None) -> None:
        self.ctx, self.pipe, self.faces, self.reference = ctx, pipe, faces, reference
        self.second, self.second_reference = second, second_reference
        self.spec = ctx.job.spec.evaluate
        self.resumed = 0
        self.batches = 0  # batches rendered by this run (the fault points count them)

    def cells(self, column: Column, index: int, prompt: str, seeds: list[int], embeds: Any = None) -> list[dict[str, Any]]:
        record = _record(column.name, index, seeds[0])
        done = self._finished(record, seeds)
        if done is not None:
            self.resumed += len(done)
            return done
        ctx = self.ctx
        where = f"evaluate: {column.name} prompt {index} seeds {seeds[0]}-{seeds[-1]}"
        ctx.check_stop(where)
        images = render(self.pipe, prompt, ctx.settings.render.negative_prompt, seeds, steps=self.spec.steps, guidance=self.spec.guidance,
                        size=ctx.training_resolution, on_step=lambda: ctx.check_stop(where), ip_adapter_image_embeds=embeds)
        rows = [self._keep(column, index, prompt, seed, rgb) for seed, rgb in zip(seeds, images)]
        # Recorded in the audit log: a resume reads back only this very record (StageContext.read_recorded).
        ctx.write_recorded("scratch_written", {record: (json.dumps(rows, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()},
                           stage=NAME)
        self.batches += 1
        pause_point(f"evaluate:batch:{self.batches}")
        return rows

    def _keep(self, column: Column, index: int, prompt: str, seed: int, rgb: np.ndarray) -> dict[str, Any]:
        ctx = self.ctx
        drift, face, _ = score_face(self.faces, rgb, self.reference)
        second = None
        if face is not None and self.second is not None and self.second_reference is not None:
            from engine.identity import second as identity2
            second = round(identity2.distance(self.second_reference, self.second.describe(rgb, face.box)), 6)
        locked = None if drift is None else drift <= self.spec.threshold
        file = f"{layout.EVALUATE_CELLS_DIR}/{column.name}/p{index}_seed{seed}_drift_{drift_label(drift)}.png"
        facts = {"group": column.name, "method": column.method, "source": column.source, "lora_weight": column.weight if column.lora else None,
                 "faceid_scale": column.faceid_scale, "prompt_index": index, "prompt": prompt, "seed": seed,
                 "steps": self.spec.steps, "guidance": self.spec.guidance, "face_found": face is not None, "drift": drift, "locked": locked,
                 "identity2_distance": second}
        scratch = _scratch_image(file)
        credentials = ctx.write_generated_image(scratch, rgb, png_text(**facts, negative_prompt=ctx.settings.render.negative_prompt, demo=ctx.demo,
                                                                       models=ctx.models_used, job_id=ctx.job_id), {"stage": NAME, **facts})
        ctx.progress("evaluate_cell", group=column.name, prompt_index=index, seed=seed, face_found=face is not None, drift=drift)
        return {**facts, "file": file, "sha256": sha256_file(ctx.path(scratch)), "credentials": credentials}

    def _finished(self, record: str, seeds: list[int]) -> list[dict[str, Any]] | None:
        """A batch an interrupted run of this very stage finished (its record as the audit log
        recorded it, and its images as the record says)."""
        data = self.ctx.read_recorded(record, stage=NAME)
        if data is None:
            return None
        rows = json.loads(data.decode("utf-8"))
        if [row["seed"] for row in rows] != seeds:
            return None
        for row in rows:
            image = self.ctx.path(_scratch_image(row["file"]))
            if not image.is_file() or sha256_file(image) != row["sha256"]:
                return None
        return rows


def _record(group: str, index: int, first_seed: int) -> str:
    return f"{layout.EVALUATE_PROGRESS_DIR}/{group}_p{index}_b{first_seed}.json"


def _scratch_image(file: str) -> str:
    """Where a cell's image waits until the grid is finished (scratch, same relative place)."""
    return f"{layout.EVALUATE_PROGRESS_DIR}/{Path(file).relative_to(layout.EVALUATE_DIR).as_posix()}"


def _relative(ctx: StageContext, path: Path) -> str:
    """A LoRA's path as the records name it, inside the job folder (a brought file: in its inputs/ copy)."""
    return path.relative_to(ctx.job_dir).as_posix()


def _extra_steps(ctx: StageContext, column: Column) -> int:
    """Training steps this group cost beyond the job's own LoRA (a phase snapshot and a brought file: none)."""
    if column.index is None or not ctx.job.spec.evaluate.group[column.index].photos:
        return 0
    train = json.loads(ctx.path(layout.TRAIN_INFO).read_text("utf-8"))
    return next(group["total_steps"] for group in train.get("groups", []) if group["name"] == column.name)


def _write_sheets(ctx: StageContext, columns: list[Column], rows: list[dict[str, Any]]) -> None:
    """One contact sheet per group: prompt rows x seed columns, the drift under each cell (NO FACE in red)."""
    spec = ctx.job.spec.evaluate
    label = 20
    prompts = len(evaluate_prompts(ctx.job.spec))
    for column in columns:
        sheet = np.full((prompts * (SHEET_CELL + label), len(spec.seeds) * SHEET_CELL, 3), 255, dtype=np.uint8)
        for row in rows:
            if row["group"] != column.name:
                continue
            r, c = row["prompt_index"], spec.seeds.index(row["seed"])
            top = r * (SHEET_CELL + label)
            sheet[top:top + SHEET_CELL, c * SHEET_CELL:(c + 1) * SHEET_CELL] = cv2.resize(read_rgb(ctx.path(row["file"])), (SHEET_CELL, SHEET_CELL),
                                                                                             interpolation=cv2.INTER_AREA)
            text, colour = (f"p{r} s{row['seed']} {row['drift']:.3f}", (0, 0, 0)) if row["face_found"] else (f"p{r} s{row['seed']} NO FACE", (200, 0, 0))
            cv2.putText(sheet, text, (c * SHEET_CELL + 3, top + SHEET_CELL + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.36, colour, 1, cv2.LINE_AA)
        atomic_write_bytes(ctx.path(layout.evaluate_sheet(column.name)), png_bytes(sheet))


def _write_reports(ctx: StageContext, columns: list[Column], rows: list[dict[str, Any]], resumed: int) -> None:
    spec = ctx.job.spec.evaluate
    prompts = evaluate_prompts(ctx.job.spec)
    by_prompt = [{"group": column.name, "prompt_index": index,
                  **evalstats.summarise([row["drift"] for row in rows if row["group"] == column.name and row["prompt_index"] == index], spec.threshold)}
                 for column in columns for index in range(len(prompts))]
    by_group = [{"group": column.name, **evalstats.summarise([row["drift"] for row in rows if row["group"] == column.name], spec.threshold),
                 "identity2_mean": evalstats.summarise([row["identity2_distance"] for row in rows if row["group"] == column.name], 0.0)["mean"]}
                for column in columns]
    tests = []
    if spec.control:
        control = {(row["prompt_index"], row["seed"]): row["drift"] for row in rows if row["group"] == CONTROL_GROUP}
        for column in columns:
            if column.index is not None:
                cells = {(row["prompt_index"], row["seed"]): row["drift"] for row in rows if row["group"] == column.name}
                tests.append({"group": column.name, **evalstats.paired_test(cells, control)})
        for test, adjusted in zip(tests, evalstats.holm([test["p_value"] for test in tests])):
            test["p_holm"] = adjusted
    not_found = sum(not row["face_found"] for row in rows)
    report = {
        "job_id": ctx.job_id, "subject": ctx.job.subject, "demo": ctx.demo,
        "note": "demo model: random weights, the cells are noise" if ctx.demo else "",
        "prompts": prompts, "seeds": list(spec.seeds), "threshold": spec.threshold, "steps": spec.steps, "guidance": spec.guidance,
        "negative_prompt": ctx.settings.render.negative_prompt, "resolution": ctx.training_resolution, "batch_size": spec.batch_size,
        "control": spec.control, "groups": [column.facts(ctx) for column in columns],
        "cells": rows, "by_prompt": by_prompt, "by_group": by_group, "tests": tests,
        "test_rule": "Wilcoxon signed-rank, two-sided, group vs control on the same (prompt, seed) cells where both found a face; "
                     "difference = group drift - control drift (negative: closer to the subject); p_holm: Holm-Bonferroni over the groups",
        "faces_not_found": not_found, "cells_total": len(rows),
        "faceid_note": f"{faceid.DRIFT_NOTE} (identity2_mean)" if any(c.faceid_scale is not None for c in columns) else "",
    }
    atomic_write_json(ctx.path(layout.EVALUATE_INFO), report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS} | {"demo": str(ctx.demo).lower()})
    atomic_write_text(ctx.path(layout.EVALUATE_CSV), buffer.getvalue())
    ctx.audit.event("evaluate_scored", cells=len(rows), faces_not_found=not_found, resumed_cells=resumed,
                    tests=[{k: test[k] for k in ("group", "n", "median_difference", "p_value", "p_holm")} for test in tests])
    ctx.log.info("evaluate_scored", cells=len(rows), faces_not_found=not_found, resumed_cells=resumed)
