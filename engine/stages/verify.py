"""Stage 4, verify (seed discovery): which seed renders the subject closest to the reference?

The identity prompt is rendered at every candidate seed with the job's identity method
([identity] method: its LoRA, FaceID, or both; in batches), and at the same seeds with no
adapter at all: the control group, so the report shows what the method adds. With [identity]
compare the other methods render on the same seeds too (LoRA, FaceID, both, control: four
rows). Each render is detected and embedded; renders where no face is found are counted, never
scored. The seed with the least drift of the job's method is locked when its drift is at most
the threshold; otherwise the job still renders from it, and the report and audit say
`not_locked`.
"""

from __future__ import annotations

from typing import Any

from engine import layout
from engine.context import StageContext
from engine.diffusion.sampling import drift_label, png_text, render
from engine.identity.faceid import DRIFT_NOTE, check_job_face_pack, identity_adapters
from engine.identity.faces import score
from engine.fsutil import atomic_write_json, sha256_file
from engine.kinds.replicate import IdentitySpec, verify_prompt
from engine.kinds.sections import CONTROL_GROUP
from engine.schema import to_plain

NAME = "verify"
VERSION = 5  # 2: images carry C2PA Content Credentials (with lab keys); verify.json says which; 3: the prompt's {trigger} is train.trigger
#             4: its models are declared (models()), the runner fingerprints them; 5: [identity] (method, compare): groups beyond lora/control
OUTPUTS = (layout.VERIFY_DIR,)
MODELS = ("base", "faces", "faceid")  # every model role it may use (engine.inventory checks them); models(ctx): this job's
GUIDANCE = 5.8  # the identity anchor's CFG (spec, render phase 1)
FILE_PREFIX = {"lora": "", "faceid": "faceid_", "lora+faceid": "lora_faceid_", CONTROL_GROUP: "control_"}


def models(ctx: StageContext) -> tuple[str, ...]:
    return ("base", "faces") + (("faceid",) if ctx.job.spec.identity.verify_uses_faceid else ())


def fingerprint(ctx: StageContext) -> dict[str, object]:
    identity = ctx.job.spec.identity
    extra = {} if identity == IdentitySpec() else {"identity": to_plain(identity)}
    return {
        "verify": to_plain(ctx.job.spec.verify),
        "prompt": verify_prompt(ctx.job.spec),
        "negative_prompt": ctx.settings.render.negative_prompt,
        "resolution": ctx.training_resolution,
        "content_signer": ctx.resources.trust_facts().get("content_signer"),
        **extra,
    }


def group_facts(ctx: StageContext, group: str) -> dict[str, Any]:
    """What conditions a group's renders (the LoRA at 1, FaceID at faceid_scale), for its image
    records and the audit: the LoRA's hash, and the embedding FaceID was conditioned on (the
    adapter's own hashes are in models_used)."""
    uses_lora = "lora" in group
    facts: dict[str, Any] = {"lora_weight": 1.0 if uses_lora else 0.0, "lora_sha256": sha256_file(ctx.path(layout.LORA_FILE)) if uses_lora else None}
    if "faceid" in group:
        facts["faceid"] = {"scale": ctx.job.spec.identity.faceid_scale, "embedding": layout.REFERENCE_FILE,
                           "embedding_sha256": sha256_file(ctx.path(layout.REFERENCE_FILE))}
    return facts


def _faceid_text(facts: dict[str, Any]) -> dict[str, Any]:
    return {"faceid_scale": facts["faceid"]["scale"]} if "faceid" in facts else {}


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.verify
    identity = ctx.job.spec.identity
    groups = identity.verify_groups
    pipe = ctx.use("base")
    faces = ctx.use("faces")
    if identity.verify_uses_faceid:
        check_job_face_pack(faces, ctx.demo, "identity.method" if identity.uses_faceid else "identity.compare")
    reference = layout.reference_embedding(ctx.job_dir)
    size = ctx.training_resolution
    negative = ctx.settings.render.negative_prompt
    prompt = verify_prompt(ctx.job.spec)  # "{trigger}" -> train.trigger
    seeds = list(spec.seed_list)
    batches = [seeds[i : i + spec.batch_size] for i in range(0, len(seeds), spec.batch_size)]
    candidates: dict[int, dict[str, Any]] = {seed: {"seed": seed} for seed in seeds}
    ctx.path(layout.VERIFY_DIR).mkdir(parents=True, exist_ok=True)
    conditioning = {group: group_facts(ctx, group) for group in groups}  # the LoRA's and the embedding's hashes, read once
    for group in groups:  # each group its own adapters, loaded for its block and removed after: the control has none
        facts = conditioning[group]
        lora = ctx.path(layout.LORA_DIR) if "lora" in group else None
        faceid = ctx.use("faceid") if "faceid" in group else None
        with identity_adapters(pipe, lora, faceid, reference) as adapters:
            adapters.set(1.0, identity.faceid_scale)
            embeds = adapters.embeds(GUIDANCE)
            for batch in batches:
                where = f"verify: {group} seeds {batch[0]}-{batch[-1]}"
                ctx.check_stop(where)
                images = render(pipe, prompt, negative, batch, steps=spec.steps, guidance=GUIDANCE, size=size,
                                on_step=lambda: ctx.check_stop(where), ip_adapter_image_embeds=embeds)
                for seed, rgb in zip(batch, images):
                    drift, face_found = score(faces, rgb, reference)
                    file_name = f"{layout.VERIFY_DIR}/{FILE_PREFIX[group]}seed_{seed}_drift_{drift_label(drift)}.png"
                    text = png_text(prompt=prompt, negative_prompt=negative, seed=seed, group=group, lora_weight=facts["lora_weight"],
                                    guidance=GUIDANCE, steps=spec.steps, drift=drift, face_found=face_found, demo=ctx.demo,
                                    models=ctx.models_used, job_id=ctx.job_id, **_faceid_text(facts))
                    credentials = ctx.write_generated_image(file_name, rgb, text, {
                        "stage": NAME, "group": group, "seed": seed, "prompt": prompt, "guidance": GUIDANCE, "steps": spec.steps, "drift": drift,
                        "face_found": face_found, "models": dict(ctx.models_used), **facts})
                    candidates[seed][group] = {"drift": drift, "face_found": face_found, "file": file_name, "credentials": credentials}
                    ctx.progress("seed_scored", seed=seed, group=group, lora="lora" in group, drift=drift, face_found=face_found)

    method = identity.method
    scored = sorted((c[method]["drift"], seed) for seed, c in candidates.items() if c[method]["drift"] is not None)
    best_seed = scored[0][1] if scored else seeds[0]
    best_drift = scored[0][0] if scored else None
    locked = best_drift is not None and best_drift <= spec.threshold
    faces_not_found = {group: sum(not c[group]["face_found"] for c in candidates.values()) for group in groups}
    if not scored:
        reason = "no face found in any candidate render"
    elif locked:
        reason = f"best drift {best_drift:.4f} <= threshold {spec.threshold}"
    else:
        reason = f"best drift {best_drift:.4f} > threshold {spec.threshold}"
    outcome = {
        "status": "locked" if locked else "not_locked",
        "reason": reason,
        "best_seed": best_seed,
        "best_drift": best_drift,
        "locked_seed": best_seed if locked else None,
        "threshold": spec.threshold,
        "faces_not_found": faces_not_found,
        "method": method,
    }
    atomic_write_json(ctx.path(layout.VERIFY_INFO), {
        **outcome,
        "prompt": prompt,
        "negative_prompt": negative,
        "guidance": GUIDANCE,
        "steps": spec.steps,
        "resolution": size,
        "batch_layout": batches,
        "groups": list(groups),
        "group_facts": conditioning,
        "faceid_note": f"{DRIFT_NOTE} (identity2 in the drift report)" if identity.verify_uses_faceid else "",
        "ranking": [seed for _, seed in scored],
        "candidates": [candidates[seed] for seed in seeds],
        "demo": ctx.demo,
    })
    extra = {} if identity == IdentitySpec() else {"identity": to_plain(identity), "groups": conditioning}
    ctx.audit.event("seed_selected", **outcome, candidates=len(seeds), **extra)
    ctx.log.info("seed_selected", **outcome)

