"""Stage mine (kind `evaluate`, with `[mine] enabled = true`): anchored face mining from the job's
trained LoRA.

Candidates are rendered from the LoRA (the mine prompt, seeds base_seed, base_seed + 1, ...) in
growing batches (`batch`, x `growth` each time, at most `max_batch`); each is detected and
embedded, and engine.measure.mining judges it against the growing group and against the real subject's
reference embedding (the anchor: a group that cannot wander off to another face). Mining stops
at `target` members or after `budget` candidates. Without `enabled` the stage does nothing and
writes nothing.

Outputs (engine.layout): mine/candidates/seed_<s>.png (every candidate; PNG text, C2PA with lab
keys) and mine/mine.json: the rule, and per candidate the bound at the time, its mean drift to the
group, its drift to the anchor, the decision and the batch after which it was pruned; the
members at the end and the group's centroid drift to the reference. An interrupted run reads
back every batch it had finished (their embeddings replay the same decisions) and redoes the one
it was in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine import layout
from engine.context import StageContext
from engine.diffusion.sampling import identity_lora, png_text, render
from engine.identity.faces import score_face
from engine.faults import pause_point
from engine.fsutil import atomic_write_json, sha256_file
from engine.kinds.evaluate import mine_prompt
from engine.measure.mining import ACCEPTED, Miner, cosine_drift
from engine.schema import to_plain

NAME = "mine"
VERSION = 1
OUTPUTS = (layout.MINE_DIR,)
SCRATCH = (layout.MINE_PROGRESS_DIR,)
MODELS = ("base", "faces")  # every model role it may use (engine.inventory checks them); models(ctx): this job's


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS if ctx.job.spec.mine.enabled else ()


def fingerprint(ctx: StageContext) -> dict[str, object]:
    spec = ctx.job.spec.mine
    if not spec.enabled:
        return {"mine": "off"}
    return {"mine": to_plain(spec), "prompt": mine_prompt(ctx.job.spec), "negative_prompt": ctx.settings.render.negative_prompt,
            "resolution": ctx.training_resolution, "content_signer": ctx.resources.trust_facts().get("content_signer")}


def batch_sizes(spec: Any) -> list[int]:
    """The growing batches, in candidates, until the budget is spent (mining may stop sooner)."""
    sizes: list[int] = []
    size = float(spec.batch)
    while sum(sizes) < spec.budget:
        sizes.append(min(int(size), spec.max_batch, spec.budget - sum(sizes)))
        size = min(size * spec.growth, float(spec.max_batch))
    return sizes


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.mine
    if not spec.enabled:
        ctx.log.info("mine_skipped", reason="[mine] enabled is false")
        return
    pipe, faces = ctx.use("base"), ctx.use("faces")
    reference = layout.reference_embedding(ctx.job_dir)
    miner = Miner(spec, anchor=reference)  # the job's [mine] is engine.measure.mining's rule
    prompt = mine_prompt(ctx.job.spec)
    ctx.path(layout.MINE_PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    resumed = 0
    seed = spec.base_seed
    with identity_lora(pipe, ctx.path(layout.LORA_DIR)) as lora:
        lora.weight(spec.lora_weight)
        for number, size in enumerate(batch_sizes(spec)):
            if miner.done:
                break
            seeds = list(range(seed, seed + size))
            seed += size
            batch = _finished(ctx, number, seeds)
            if batch is None:
                batch = _render_batch(ctx, pipe, faces, reference, prompt, number, seeds)
            else:
                resumed += len(seeds)
            for row, embedding in batch:
                rows[row["seed"]] = row
            miner.offer([(row["seed"], embedding) for row, embedding in batch])
    for candidate in miner.candidates:
        target = ctx.path(rows[candidate.id]["file"])
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ctx.path(_scratch(rows[candidate.id]["file"])), target)
    _write_report(ctx, miner, rows, prompt, resumed, reference)


def _render_batch(ctx: StageContext, pipe: Any, faces: Any, reference: np.ndarray, prompt: str, number: int,
                  seeds: list[int]) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    spec = ctx.job.spec.mine
    where = f"mine: batch {number} seeds {seeds[0]}-{seeds[-1]}"
    ctx.check_stop(where)
    images = render(pipe, prompt, ctx.settings.render.negative_prompt, seeds, steps=spec.steps, guidance=spec.guidance,
                    size=ctx.training_resolution, on_step=lambda: ctx.check_stop(where))
    out: list[tuple[dict[str, Any], np.ndarray | None]] = []
    for seed, rgb in zip(seeds, images):
        drift, face, embedding = score_face(faces, rgb, reference)  # one embedding per candidate: scored and mined
        file = f"{layout.MINE_CANDIDATES_DIR}/seed_{seed}.png"
        facts = {"seed": seed, "batch": number, "prompt": prompt, "lora_weight": spec.lora_weight, "steps": spec.steps, "guidance": spec.guidance,
                 "face_found": face is not None, "drift_to_reference": drift}
        credentials = ctx.write_generated_image(_scratch(file), rgb, png_text(**facts, demo=ctx.demo, models=ctx.models_used, job_id=ctx.job_id),
                                                {"stage": NAME, **facts})
        out.append(({**facts, "file": file, "sha256": sha256_file(ctx.path(_scratch(file))), "credentials": credentials}, embedding))
        ctx.progress("mine_candidate", seed=seed, face_found=face is not None)
    # The embeddings as the face model gave them (its own dtype): a resume replays the very decisions.
    found = [e for _, e in out if e is not None]
    embeddings = (np.stack([e if e is not None else np.full(found[0].shape, np.nan, dtype=found[0].dtype) for _, e in out]) if found
                  else np.zeros((len(out), 0), dtype=np.float32))
    # Recorded in the audit log: a resume reads back only these very files (StageContext.read_recorded).
    rows = [row for row, _ in out]
    ctx.write_recorded("scratch_written", {f"{layout.MINE_PROGRESS_DIR}/batch_{number}.npy": _npy(embeddings),
                                           f"{layout.MINE_PROGRESS_DIR}/batch_{number}.json":
                                               (json.dumps(rows, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()},
                       stage=NAME)
    pause_point(f"mine:batch:{number + 1}")
    return out


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _finished(ctx: StageContext, number: int, seeds: list[int]) -> list[tuple[dict[str, Any], np.ndarray | None]] | None:
    """A batch an interrupted run of this very stage finished: its records and embeddings as the
    audit log recorded them, its images as the records say."""
    import io

    record = ctx.read_recorded(f"{layout.MINE_PROGRESS_DIR}/batch_{number}.json", stage=NAME)
    vectors = ctx.read_recorded(f"{layout.MINE_PROGRESS_DIR}/batch_{number}.npy", stage=NAME)
    if record is None or vectors is None:
        return None
    rows = json.loads(record.decode("utf-8"))
    embeddings = np.load(io.BytesIO(vectors), allow_pickle=False)
    if [row["seed"] for row in rows] != seeds or len(embeddings) != len(rows):
        return None
    for row in rows:
        image = ctx.path(_scratch(row["file"]))
        if not image.is_file() or sha256_file(image) != row["sha256"]:
            return None
    return [(row, None if not row["face_found"] else embeddings[i]) for i, row in enumerate(rows)]


def _scratch(file: str) -> str:
    return f"{layout.MINE_PROGRESS_DIR}/{Path(file).relative_to(layout.MINE_DIR).as_posix()}"


def _write_report(ctx: StageContext, miner: Miner, rows: dict[int, dict[str, Any]], prompt: str, resumed: int, reference: np.ndarray) -> None:
    candidates = [{**rows[c.id], **c.facts()} for c in miner.candidates]
    decisions: dict[str, int] = {}
    for candidate in miner.candidates:
        decisions[candidate.decision] = decisions.get(candidate.decision, 0) + 1
    centroid = miner.centroid()
    report = {
        "job_id": ctx.job_id, "subject": ctx.job.subject, "demo": ctx.demo,
        "note": "demo model: random weights, the candidates are noise" if ctx.demo else "",
        "prompt": prompt, "rule": ctx.job.spec.mine.rule_facts(), "anchored_to": layout.REFERENCE_FILE,
        "stop_reason": miner.stop_reason, "candidates": candidates, "decisions": decisions,
        "members": list(miner.members), "pruned": sum(c.pruned_at is not None for c in miner.candidates),
        "accepted_ever": sum(c.decision == ACCEPTED for c in miner.candidates),
        "centroid_drift_to_reference": None if centroid is None else round(cosine_drift(reference, centroid), 6),
        "member_files": [rows[key]["file"] for key in miner.members],
    }
    atomic_write_json(ctx.path(layout.MINE_INFO), report)
    ctx.audit.event("mine_finished", candidates=len(candidates), members=len(miner.members), stop_reason=miner.stop_reason, decisions=decisions,
                    resumed_candidates=resumed)
    ctx.log.info("mine_finished", candidates=len(candidates), members=len(miner.members), stop_reason=miner.stop_reason)
