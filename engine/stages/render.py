"""Stage 5, render: new scenes that keep the identity, from the seed verify chose.

three_pass (per output):
  1 anchor  the identity prompt, LoRA 1.0, CFG 5.8, at the selected seed
  2 scene   the scene prompt, img2img of the anchor, LoRA 0.85, CFG 6.3
  3 rescue  img2img of the scene, LoRA 0.90, CFG 6.8, then blended 30% back toward the anchor
two_pass:
  1 anchor  the scene prompt with the LoRA on the base model
  2 realism img2img of pass 1 on the realism model (no LoRA: it was trained on the base)
With [identity] method "faceid" the passes scale FaceID as they would the LoRA (faceid_scale x
the pass's LoRA weight) and no LoRA is loaded; "lora+faceid" does both.
Every pass is embedded and scored against the reference. drift_report.json/.csv list every
render of the job (verify candidates included) with seed, prompt, pass, drift, lock state, and
beside each drift the distance by a second identity model (engine.identity.second, report only).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine import layout

from engine.identity import second as identity2
from engine.context import StageContext
from engine.diffusion.sampling import drift_label, png_text, render
from engine.identity.faces import score
from engine.fsutil import atomic_write_json, atomic_write_text, sha256_file
from engine.identity.faceid import IdentityAdapters, check_job_face_pack, identity_adapters
from engine.kinds.replicate import IdentitySpec, RenderSpec, verify_prompt
from engine.schema import to_plain

NAME = "render"
VERSION = 6  # 2: images carry C2PA Content Credentials (with lab keys); the drift report says which
#             3: the drift report's rows carry the effective negative prompt, the CSV a demo column
#             4: the anchor's prompt is verify's with its {trigger} filled in (engine.kinds.replicate.verify_prompt)
#             5: its models are declared (models()), the runner fingerprints them; 6: [identity] method (FaceID, both)
OUTPUTS = (layout.RENDERS_DIR, layout.DRIFT_REPORT_JSON, layout.DRIFT_REPORT_CSV)
MODELS = ("base", "faces", "faceid", "realism", "identity2")  # every model role it may use (engine.inventory checks them); models(ctx): this job's


@dataclass(frozen=True)
class Pass:
    """One pass of a render, from the spec: the LoRA's weight, the CFG, the img2img strength
    (None: from noise), and the model (role) it runs on."""

    name: str
    lora_weight: float
    guidance: float
    strength: float | None = None
    model: str = "base"


ANCHOR = Pass("anchor", 1.0, 5.8)
SCENE = Pass("scene", 0.85, 6.3, 0.6)
RESCUE = Pass("rescue", 0.90, 6.8, 0.35)
RESCUE_BLEND_TO_ANCHOR = 0.30
TWO_PASS_ANCHOR = Pass("anchor", 1.0, 6.3)
TWO_PASS_REALISM = Pass("realism", 0.0, 5.5, 0.35, model="realism")  # no LoRA: it was trained on the base
SEED_STRIDE = 1000  # output i of a render entry uses seed + i * SEED_STRIDE for its scene passes


def models(ctx: StageContext) -> tuple[str, ...]:
    """The realism model only when a render entry is two_pass; the second identity model always
    (its numbers are in the drift report), loaded only when a render holds a face."""
    needs_realism = any(r.mode == "two_pass" for r in ctx.job.spec.render)
    faceid = ("faceid",) if ctx.job.spec.identity.uses_faceid else ()
    return ("base", "faces") + faceid + (("realism",) if needs_realism else ()) + ("identity2",)


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {
        "render": to_plain(ctx.job.spec.render),
        "trigger": ctx.job.spec.train.trigger,
        "identity_prompt": verify_prompt(ctx.job.spec),
        "negative_prompt": ctx.settings.render.negative_prompt,
        "resolution": ctx.training_resolution,
        "identity2": identity2.settings(),
        "content_signer": ctx.resources.trust_facts().get("content_signer"),
        **({} if ctx.job.spec.identity == IdentitySpec() else {"identity": to_plain(ctx.job.spec.identity)}),
    }


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec
    pipe = ctx.use("base")
    faces = ctx.use("faces")
    reference = layout.reference_embedding(ctx.job_dir)
    chosen = layout.seed_selection(ctx.job_dir)
    seed = chosen["best_seed"]
    locked = chosen["status"] == "locked"
    ctx.path(layout.RENDERS_DIR).mkdir(parents=True, exist_ok=True)
    identity = spec.identity
    if identity.uses_faceid:
        check_job_face_pack(faces, ctx.demo, "identity.method")
    lora = ctx.path(layout.LORA_DIR) if identity.uses_lora else None
    with identity_adapters(pipe, lora, ctx.use("faceid") if identity.uses_faceid else None, reference) as adapters:
        renderer = Renderer(ctx, pipe, adapters, identity, faces, reference, seed, locked, ctx.training_resolution,
                            sha256_file(ctx.path(layout.LORA_FILE)) if identity.uses_lora else None,
                            sha256_file(ctx.path(layout.REFERENCE_FILE)) if identity.uses_faceid else None)
        for entry_index, entry in enumerate(spec.render):
            shot = Shot(entry_index, entry, f"{spec.train.trigger}, {entry.prompt}",
                        ", ".join(p for p in (ctx.settings.render.negative_prompt, entry.negative_prompt) if p))
            (_three_pass if entry.mode == "three_pass" else _two_pass)(renderer, shot)
    _write_reports(ctx, chosen, renderer.rows)


@dataclass(frozen=True)
class Shot:
    """One output of one render entry: its prompt (trigger first), negative prompt, output number."""

    entry_index: int
    entry: RenderSpec
    prompt: str
    negative: str
    output: int = 0


@dataclass
class Renderer:
    """What every pass of a job's renders shares (the pipeline with the job's identity adapters,
    the face models and reference, the seed verify chose), and the drift report rows they add."""

    ctx: StageContext
    pipe: Any
    adapters: IdentityAdapters
    identity: IdentitySpec
    faces: Any
    reference: np.ndarray
    seed: int
    locked: bool
    size: int
    lora_sha256: str | None
    embedding_sha256: str | None  # what FaceID was conditioned on (None: no FaceID)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def render(self, shot: Shot, step: Pass, prompt: str, seed: int, init: np.ndarray | None = None) -> np.ndarray:
        """One image of `step`, with the stop check before it and at every denoising step (a
        SIGTERM or a lost claim waits for one step)."""
        ctx = self.ctx
        pipe = ctx.use(step.model)
        options: dict[str, Any] = {}
        if pipe is self.pipe:  # the adapters are in the base pipeline (demo: the realism model is the base itself)
            self.adapters.set(self.lora_weight(step), self.faceid_scale(step))
            options["ip_adapter_image_embeds"] = self.adapters.embeds(step.guidance)
        where = f"render {shot.entry_index}.{shot.output} {step.name}"
        ctx.check_stop(where)
        if init is not None:
            options.update(init_images=init[None], strength=step.strength, img2img=ctx.resources.img2img(pipe))
        (image,) = render(pipe, prompt, shot.negative, [seed], steps=shot.entry.steps, guidance=step.guidance, size=self.size,
                          on_step=lambda: ctx.check_stop(where), **options)
        return image

    def lora_weight(self, step: Pass) -> float:
        return step.lora_weight if self.identity.uses_lora else 0.0

    def faceid_scale(self, step: Pass) -> float | None:
        """FaceID scaled by the pass as the LoRA is (None: the job uses no FaceID)."""
        return self.identity.faceid_scale * step.lora_weight if self.identity.uses_faceid else None

    def keep(self, shot: Shot, step: Pass, prompt: str, seed: int, rgb: np.ndarray) -> None:
        """Score `rgb`, write it (with its settings in its text chunks and Content Credentials) and
        add its row to the drift report."""
        ctx, mode = self.ctx, shot.entry.mode
        drift, face_found = score(self.faces, rgb, self.reference)
        file_name = f"{layout.RENDERS_DIR}/r{shot.entry_index}_{shot.output}_{step.name}_drift_{drift_label(drift)}.png"
        text = png_text(prompt=prompt, negative_prompt=shot.negative, seed=seed, selected_seed=self.seed, locked=self.locked, mode=mode,
                        pass_name=step.name, lora_weight=self.lora_weight(step), guidance=step.guidance, strength=step.strength, drift=drift,
                        face_found=face_found, demo=ctx.demo, models=ctx.models_used, job_id=ctx.job_id, **self._faceid_facts(step, text=True))
        credentials = ctx.write_generated_image(file_name, rgb, text, {
            "stage": NAME, "render": shot.entry_index, "output": shot.output, "mode": mode, "pass": step.name, "seed": seed,
            "selected_seed": self.seed, "locked": self.locked, "prompt": prompt, "negative_prompt": shot.negative, "lora_weight": self.lora_weight(step),
            "guidance": step.guidance, "strength": step.strength, "drift": drift, "face_found": face_found, "models": dict(ctx.models_used),
            "lora_sha256": self.lora_sha256 if self.lora_weight(step) else None, **self._faceid_facts(step)})
        self.rows.append({"kind": "render", "render": shot.entry_index, "output": shot.output, "mode": mode, "pass": step.name, "seed": seed,
                          "prompt": prompt, "negative_prompt": shot.negative, "drift": drift, "face_found": face_found, "locked": self.locked,
                          "file": file_name, "credentials": credentials})
        ctx.progress("render_scored", pass_name=step.name, mode=mode, drift=drift, face_found=face_found)

    def _faceid_facts(self, step: Pass, text: bool = False) -> dict[str, Any]:
        """The FaceID scale of a pass (and for its credentials, the embedding it conditioned on);
        nothing for a job without FaceID, whose records stay as they were."""
        scale = self.faceid_scale(step)
        if scale is None:
            return {}
        if text:
            return {"faceid_scale": scale}
        return {"faceid": {"scale": scale, "embedding": layout.REFERENCE_FILE, "embedding_sha256": self.embedding_sha256}}


def _three_pass(r: Renderer, shot: Shot) -> None:
    """anchor (the identity prompt at the chosen seed, once per entry) -> scene -> rescue, per output."""
    identity_prompt = verify_prompt(r.ctx.job.spec)  # the seed's own prompt, its {trigger} filled in
    anchor = r.render(shot, ANCHOR, identity_prompt, r.seed)
    for output in range(shot.entry.count):
        shot = replace(shot, output=output)
        r.keep(shot, ANCHOR, identity_prompt, r.seed, anchor)
        scene_seed = r.seed + (output + 1) * SEED_STRIDE
        scene = r.render(shot, SCENE, shot.prompt, scene_seed, init=anchor)
        r.keep(shot, SCENE, shot.prompt, scene_seed, scene)
        rescue = r.render(shot, RESCUE, shot.prompt, scene_seed + 1, init=scene)
        final = np.clip(np.rint((1.0 - RESCUE_BLEND_TO_ANCHOR) * rescue.astype(np.float64) + RESCUE_BLEND_TO_ANCHOR * anchor.astype(np.float64)), 0, 255).astype(np.uint8)
        r.keep(shot, RESCUE, shot.prompt, scene_seed + 1, final)


def _two_pass(r: Renderer, shot: Shot) -> None:
    """anchor (the scene prompt, LoRA on the base) -> realism (img2img on the realism model), per output."""
    r.ctx.use("realism")  # loaded before the first image, whose records list it
    for output in range(shot.entry.count):
        shot = replace(shot, output=output)
        pass_seed = r.seed + output * SEED_STRIDE
        anchor = r.render(shot, TWO_PASS_ANCHOR, shot.prompt, pass_seed)
        r.keep(shot, TWO_PASS_ANCHOR, shot.prompt, pass_seed, anchor)
        final = r.render(shot, TWO_PASS_REALISM, shot.prompt, pass_seed + 1, init=anchor)
        r.keep(shot, TWO_PASS_REALISM, shot.prompt, pass_seed + 1, final)


def _write_reports(ctx: StageContext, chosen: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    verify_rows = []
    for candidate in chosen["candidates"]:
        for group in chosen.get("groups", IdentitySpec().verify_groups):  # verify.json before [identity]: the default's groups
            result = candidate[group]
            verify_rows.append({"kind": f"verify_{group}", "render": None, "output": None, "mode": "verify", "pass": group, "seed": candidate["seed"],
                                "prompt": chosen["prompt"], "negative_prompt": chosen.get("negative_prompt", ""), "drift": result["drift"], "face_found": result["face_found"],
                                "locked": chosen["status"] == "locked" and candidate["seed"] == chosen["locked_seed"], "file": result["file"],
                                "credentials": result.get("credentials", "unsigned")})
    everything = verify_rows + rows
    # The second model measures every render only now, after verify has locked the seed.
    second_model = identity2.annotate(ctx.job_dir, everything, ctx.resources.faces(), chosen["threshold"], load=lambda: ctx.use("identity2"))
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
    atomic_write_json(ctx.path(layout.DRIFT_REPORT_JSON), report)
    buffer = io.StringIO()
    # `demo` on every row: a CSV travels without its JSON, and a demo model's drifts mean nothing.
    columns = ["demo", "kind", "render", "output", "mode", "pass", "seed", "prompt", "negative_prompt", "drift", "face_found", "locked", "file",
               "credentials", "identity2_distance", "identity2_verdict", "models_disagree"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in everything:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns} | {"demo": str(ctx.demo).lower()})
    atomic_write_text(ctx.path(layout.DRIFT_REPORT_CSV), buffer.getvalue())
    ctx.audit.event("renders_scored", renders=len(rows), faces_not_found=report["faces_not_found"], status=chosen["status"],
                    identity2_disagreements=second_model.get("disagreements"))
