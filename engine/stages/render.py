"""Stage 5, render: new scenes that keep the identity, from the seed verify chose.

three_pass (per output):
  1 anchor  the identity prompt, LoRA 1.0, CFG 5.8, at the selected seed
  2 scene   the scene prompt, img2img of the anchor, LoRA 0.85, CFG 6.3
  3 rescue  img2img of the scene, LoRA 0.90, CFG 6.8, then blended 30% back toward the anchor
two_pass:
  1 anchor  the scene prompt with the LoRA on the base model
  2 realism img2img of pass 1 on the realism model (no LoRA: it was trained on the base)
Every pass is embedded and scored against the reference. drift_report.json/.csv list every
render of the job (verify candidates included) with seed, prompt, pass, drift, lock state, and
beside each drift the distance by a second identity model (engine.identity2, report only).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from engine import identity2, layout
from engine.context import StageContext
from engine.diffusion import drift_label, identity_lora, png_text, render, score
from engine.fsutil import atomic_write_json, atomic_write_text, sha256_file
from engine.job import RenderSpec, verify_prompt
from engine.schema import to_plain
from engine.stages import embed, verify

NAME = "render"
VERSION = 4  # 2: images carry C2PA Content Credentials (with lab keys); the drift report says which
#             3: the drift report's rows carry the effective negative prompt, the CSV a demo column
#             4: the anchor's prompt is verify's with its {trigger} filled in (engine.job.verify_prompt)
OUTPUTS = (layout.RENDERS_DIR, layout.DRIFT_REPORT_JSON, layout.DRIFT_REPORT_CSV)
REPORT_JSON = layout.DRIFT_REPORT_JSON
REPORT_CSV = layout.DRIFT_REPORT_CSV

# (LoRA weight, CFG, img2img strength) per pass, from the spec.
ANCHOR = (1.0, 5.8, None)
SCENE = (0.85, 6.3, 0.6)
RESCUE = (0.90, 6.8, 0.35)
RESCUE_BLEND_TO_ANCHOR = 0.30
TWO_PASS_ANCHOR = (1.0, 6.3, None)
TWO_PASS_REALISM = (0.0, 5.5, 0.35)
SEED_STRIDE = 1000  # output i of a render entry uses seed + i * SEED_STRIDE for its scene passes


def fingerprint(ctx: StageContext) -> dict[str, object]:
    needs_realism = any(r.mode == "two_pass" for r in ctx.job.spec.render)
    return {
        "render": to_plain(ctx.job.spec.render),
        "trigger": ctx.job.spec.train.trigger,
        "identity_prompt": verify_prompt(ctx.job.spec),
        "negative_prompt": ctx.settings.render.negative_prompt,
        "base_model": ctx.resources.base_model_hashes(),
        "realism_model": ctx.resources.realism_model_hashes() if needs_realism else None,
        "faces": ctx.resources.faces().hashes(),
        "resolution": ctx.training_resolution,
        "identity2": identity2.fingerprint(),
        "content_signer": ctx.resources.trust_facts().get("content_signer"),
    }


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec
    faces = ctx.resources.faces()
    pipe = ctx.resources.pipeline()
    ctx.models_used.update(ctx.resources.base_model_hashes())
    ctx.models_used.update(faces.hashes())
    reference = embed.load_reference(ctx)
    chosen = verify.load_outcome(ctx)
    seed = chosen["best_seed"]
    locked = chosen["status"] == "locked"
    size = ctx.training_resolution
    rows: list[dict[str, Any]] = []
    lora_sha256 = sha256_file(ctx.path(layout.LORA_FILE))
    ctx.path("renders").mkdir(parents=True, exist_ok=True)

    def keep(entry_index: int, output_index: int, pass_name: str, mode: str, prompt: str, negative: str, pass_seed: int,
             rgb: np.ndarray, settings: tuple[float, float, float | None]) -> None:
        drift, face_found = score(faces, rgb, reference)
        file_name = f"{layout.RENDERS_DIR}/r{entry_index}_{output_index}_{pass_name}_drift_{drift_label(drift)}.png"
        weight, guidance, strength = settings
        text = png_text(prompt=prompt, negative_prompt=negative, seed=pass_seed, selected_seed=seed, locked=locked, mode=mode,
                        pass_name=pass_name, lora_weight=weight, guidance=guidance, strength=strength, drift=drift,
                        face_found=face_found, demo=ctx.demo, models=ctx.models_used, job_id=ctx.job_id)
        credentials = ctx.write_generated_image(file_name, rgb, text, {
            "stage": NAME, "render": entry_index, "output": output_index, "mode": mode, "pass": pass_name, "seed": pass_seed,
            "selected_seed": seed, "locked": locked, "prompt": prompt, "negative_prompt": negative, "lora_weight": weight, "guidance": guidance, "strength": strength,
            "drift": drift, "face_found": face_found, "models": dict(ctx.models_used), "lora_sha256": lora_sha256 if weight else None})
        rows.append({"kind": "render", "render": entry_index, "output": output_index, "mode": mode, "pass": pass_name, "seed": pass_seed,
                     "prompt": prompt, "negative_prompt": negative, "drift": drift, "face_found": face_found, "locked": locked, "file": file_name,
                     "credentials": credentials})
        ctx.progress("render_scored", pass_name=pass_name, mode=mode, drift=drift, face_found=face_found)

    with identity_lora(pipe, ctx.path(layout.LORA_DIR)) as lora:
        for entry_index, entry in enumerate(spec.render):
            prompt = f"{spec.train.trigger}, {entry.prompt}"
            negative = ", ".join(p for p in (ctx.settings.render.negative_prompt, entry.negative_prompt) if p)
            if entry.mode == "three_pass":
                _three_pass(ctx, pipe, lora, entry, entry_index, prompt, negative, seed, size, keep)
            else:
                _two_pass(ctx, pipe, lora, entry, entry_index, prompt, negative, seed, size, keep)
    _write_reports(ctx, chosen, rows)


def _render_one(ctx: StageContext, where: str, pipe: Any, prompt: str, negative: str, seed: int, **options: Any) -> np.ndarray:
    """One image, with the stop check before it and at every denoising step (a SIGTERM or a lost
    claim waits for one step)."""
    ctx.check_stop(where)
    (image,) = render(pipe, prompt, negative, [seed], on_step=lambda: ctx.check_stop(where), **options)
    return image


def _three_pass(ctx, pipe, lora, entry: RenderSpec, entry_index, prompt, negative, seed, size, keep) -> None:
    identity_prompt = verify_prompt(ctx.job.spec)  # the seed's own prompt, its {trigger} filled in
    lora.weight(ANCHOR[0])
    anchor = _render_one(ctx, f"render {entry_index} anchor", pipe, identity_prompt, negative, seed, steps=entry.steps, guidance=ANCHOR[1], size=size)
    for output in range(entry.count):
        keep(entry_index, output, "anchor", "three_pass", identity_prompt, negative, seed, anchor, ANCHOR)
        scene_seed = seed + (output + 1) * SEED_STRIDE
        lora.weight(SCENE[0])
        scene = _render_one(ctx, f"render {entry_index}.{output} scene", pipe, prompt, negative, scene_seed, steps=entry.steps, guidance=SCENE[1],
                            size=size, init_images=anchor[None], strength=SCENE[2])
        keep(entry_index, output, "scene", "three_pass", prompt, negative, scene_seed, scene, SCENE)
        lora.weight(RESCUE[0])
        rescue = _render_one(ctx, f"render {entry_index}.{output} rescue", pipe, prompt, negative, scene_seed + 1, steps=entry.steps,
                             guidance=RESCUE[1], size=size, init_images=scene[None], strength=RESCUE[2])
        final = np.clip(np.rint((1.0 - RESCUE_BLEND_TO_ANCHOR) * rescue.astype(np.float64) + RESCUE_BLEND_TO_ANCHOR * anchor.astype(np.float64)), 0, 255).astype(np.uint8)
        keep(entry_index, output, "rescue", "three_pass", prompt, negative, scene_seed + 1, final, RESCUE)


def _two_pass(ctx, pipe, lora, entry: RenderSpec, entry_index, prompt, negative, seed, size, keep) -> None:
    realism = ctx.resources.realism_pipeline()
    ctx.models_used.update(ctx.resources.realism_model_hashes())
    lora.weight(TWO_PASS_ANCHOR[0])
    for output in range(entry.count):
        pass_seed = seed + output * SEED_STRIDE
        anchor = _render_one(ctx, f"render {entry_index}.{output} anchor", pipe, prompt, negative, pass_seed, steps=entry.steps,
                             guidance=TWO_PASS_ANCHOR[1], size=size)
        keep(entry_index, output, "anchor", "two_pass", prompt, negative, pass_seed, anchor, TWO_PASS_ANCHOR)
        if realism is pipe:
            lora.off()  # demo: the realism model is the base model itself, without the LoRA
        final = _render_one(ctx, f"render {entry_index}.{output} realism", realism, prompt, negative, pass_seed + 1, steps=entry.steps,
                            guidance=TWO_PASS_REALISM[1], size=size, init_images=anchor[None], strength=TWO_PASS_REALISM[2])
        lora.weight(TWO_PASS_ANCHOR[0])
        keep(entry_index, output, "realism", "two_pass", prompt, negative, pass_seed + 1, final, TWO_PASS_REALISM)


def _write_reports(ctx: StageContext, chosen: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    verify_rows = []
    for candidate in chosen["candidates"]:
        for group in ("lora", "control"):
            result = candidate[group]
            verify_rows.append({"kind": f"verify_{group}", "render": None, "output": None, "mode": "verify", "pass": group, "seed": candidate["seed"],
                                "prompt": chosen["prompt"], "negative_prompt": chosen.get("negative_prompt", ""), "drift": result["drift"], "face_found": result["face_found"],
                                "locked": chosen["status"] == "locked" and candidate["seed"] == chosen["locked_seed"], "file": result["file"],
                                "credentials": result.get("credentials", "unsigned")})
    everything = verify_rows + rows
    # The second model measures every render only now, after verify has locked the seed.
    second_model, second_model_files = identity2.annotate(ctx.job_dir, everything, ctx.resources.faces(), chosen["threshold"])
    ctx.models_used.update(second_model_files)
    report = {
        "job_id": ctx.job_id,
        "subject": ctx.job.subject,
        "demo": ctx.demo,
        "note": "demo model: random weights, renders are noise, drifts are meaningless" if ctx.demo else "",
        "drift": "1 - cosine(reference ArcFace embedding, render embedding); null where no face was found",
        "seed_selection": {k: chosen[k] for k in ("status", "reason", "best_seed", "best_drift", "locked_seed", "threshold", "faces_not_found")},
        "renders": everything,
        "faces_not_found": sum(not row["face_found"] for row in everything),
        "identity2": second_model,
    }
    atomic_write_json(ctx.path(REPORT_JSON), report)
    buffer = io.StringIO()
    # `demo` on every row: a CSV travels without its JSON, and a demo model's drifts mean nothing.
    columns = ["demo", "kind", "render", "output", "mode", "pass", "seed", "prompt", "negative_prompt", "drift", "face_found", "locked", "file",
               "credentials", "identity2_distance", "identity2_verdict", "models_disagree"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in everything:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns} | {"demo": str(ctx.demo).lower()})
    atomic_write_text(ctx.path(REPORT_CSV), buffer.getvalue())
    ctx.audit.event("renders_scored", renders=len(rows), faces_not_found=report["faces_not_found"], status=chosen["status"],
                    identity2_disagreements=second_model.get("disagreements"))
