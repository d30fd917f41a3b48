"""Stage 4, verify (seed discovery): which seed renders the subject closest to the reference?

The identity prompt is rendered at every candidate seed with the LoRA (in batches), and at
the same seeds without it: the control group, so the report shows what the LoRA adds. Each
render is detected and embedded; renders where no face is found are counted, never scored.
The seed with the least drift is locked when its drift is at most the threshold; otherwise
the job still renders from it, and the report and audit say `not_locked`.
"""

from __future__ import annotations


from engine import layout
from engine.context import StageContext
from engine.diffusion import drift_label, identity_lora, png_text, render
from engine.faces import score
from engine.fsutil import atomic_write_json, sha256_file
from engine.job import verify_prompt
from engine.schema import to_plain

NAME = "verify"
VERSION = 4  # 2: images carry C2PA Content Credentials (with lab keys); verify.json says which; 3: the prompt's {trigger} is train.trigger
#             4: its models are declared (models()), the runner fingerprints them
OUTPUTS = (layout.VERIFY_DIR,)
GUIDANCE = 5.8  # the identity anchor's CFG (spec, render phase 1)


def models(ctx: StageContext) -> tuple[str, ...]:
    return ("base", "faces")


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {
        "verify": to_plain(ctx.job.spec.verify),
        "prompt": verify_prompt(ctx.job.spec),
        "negative_prompt": ctx.settings.render.negative_prompt,
        "resolution": ctx.training_resolution,
        "content_signer": ctx.resources.trust_facts().get("content_signer"),
    }


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.verify
    pipe = ctx.use("base")
    faces = ctx.use("faces")
    reference = layout.reference_embedding(ctx.job_dir)
    size = ctx.training_resolution
    negative = ctx.settings.render.negative_prompt
    prompt = verify_prompt(ctx.job.spec)  # "{trigger}" -> train.trigger
    seeds = list(spec.seed_list)
    batches = [seeds[i : i + spec.batch_size] for i in range(0, len(seeds), spec.batch_size)]
    candidates = {seed: {"seed": seed} for seed in seeds}
    lora_sha256 = sha256_file(ctx.path(layout.LORA_FILE))
    ctx.path(layout.VERIFY_DIR).mkdir(parents=True, exist_ok=True)
    with identity_lora(pipe, ctx.path(layout.LORA_DIR)) as lora:
        for group, with_lora in (("lora", True), ("control", False)):
            lora.weight(1.0) if with_lora else lora.off()
            for batch in batches:
                where = f"verify: {group} seeds {batch[0]}-{batch[-1]}"
                ctx.check_stop(where)
                images = render(pipe, prompt, negative, batch, steps=spec.steps, guidance=GUIDANCE, size=size,
                                on_step=lambda: ctx.check_stop(where))
                for seed, rgb in zip(batch, images):
                    drift, face_found = score(faces, rgb, reference)
                    prefix = "" if with_lora else "control_"
                    file_name = f"{layout.VERIFY_DIR}/{prefix}seed_{seed}_drift_{drift_label(drift)}.png"
                    text = png_text(prompt=prompt, negative_prompt=negative, seed=seed, group=group, lora_weight=1.0 if with_lora else 0.0,
                                    guidance=GUIDANCE, steps=spec.steps, drift=drift, face_found=face_found, demo=ctx.demo,
                                    models=ctx.models_used, job_id=ctx.job_id)
                    credentials = ctx.write_generated_image(file_name, rgb, text, {
                        "stage": NAME, "group": group, "seed": seed, "prompt": prompt, "lora_weight": 1.0 if with_lora else 0.0,
                        "guidance": GUIDANCE, "steps": spec.steps, "drift": drift, "face_found": face_found,
                        "models": dict(ctx.models_used), "lora_sha256": lora_sha256 if with_lora else None})
                    candidates[seed][group] = {"drift": drift, "face_found": face_found, "file": file_name, "credentials": credentials}
                    ctx.progress("seed_scored", seed=seed, lora=with_lora, drift=drift, face_found=face_found)

    scored = sorted((c["lora"]["drift"], seed) for seed, c in candidates.items() if c["lora"]["drift"] is not None)
    best_seed = scored[0][1] if scored else seeds[0]
    best_drift = scored[0][0] if scored else None
    locked = best_drift is not None and best_drift <= spec.threshold
    faces_not_found = {group: sum(not c[group]["face_found"] for c in candidates.values()) for group in ("lora", "control")}
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
    }
    atomic_write_json(ctx.path(layout.VERIFY_INFO), {
        **outcome,
        "prompt": prompt,
        "negative_prompt": negative,
        "guidance": GUIDANCE,
        "steps": spec.steps,
        "resolution": size,
        "batch_layout": batches,
        "ranking": [seed for _, seed in scored],
        "candidates": [candidates[seed] for seed in seeds],
        "demo": ctx.demo,
    })
    ctx.audit.event("seed_selected", **outcome, candidates=len(seeds))
    ctx.log.info("seed_selected", **outcome)

