"""Stage 3, train: the job's LoRAs, each trained by engine.diffusion.training.train_lora.

What a job trains is its kind's (engine.kinds.Kind.lora_runs): a replicate job one LoRA on
every prepared image (lora/, with the kohya-format copy); an evaluate grid also keeps the LoRA
as it stood at the exit of the phases its groups name (lora/phases/<PHASE>/, no extra step) and
trains one LoRA per photo-subset group on that subset's prepared images, with the job's train
settings (lora/groups/<name>/). Runs go one after the other, each with its own checkpoint files,
so an interrupted stage resumes the run it was in (a finished run resumes from its final
checkpoint at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import layout
from engine.context import StageContext
from engine.fsutil import atomic_write_json, atomic_write_text
from engine.images import read_rgb
from engine.kinds import kind_named
from engine.kinds.sections import LoraRun, TrainSpec
from engine.schema import to_plain
from engine.diffusion.families import Family, family_of
from engine.diffusion.models import model_family
from engine.diffusion.training import LoraTarget, TrainingResult, caption, train_lora

NAME = "train"
VERSION = 5  # 2: train.json no longer records the step a resume started from; 3: lora/ also holds the kohya-format file
#             4: its models are declared (models()), the runner fingerprints them; 5: a kind's lora_runs (phase snapshots, group LoRAs)
OUTPUTS = (layout.LORA_DIR, layout.TRAIN_DIR)
SCRATCH = (layout.CHECKPOINTS_DIR,)  # kept when an interrupted run resumes, removed otherwise
MODELS = ("base",)  # every model role it may use (engine.inventory checks them); models(ctx): this job's


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS


def _runs(ctx: StageContext) -> tuple[LoraRun, ...]:
    return kind_named(ctx.job.kind).lora_runs(ctx.job.spec)


def fingerprint(ctx: StageContext) -> dict[str, object]:
    runs = _runs(ctx)
    extra = {} if runs == (LoraRun(),) else {"runs": [to_plain(run) for run in runs]}
    return {"train": to_plain(ctx.job.spec.train), "resolution": ctx.training_resolution, **extra}


def run(ctx: StageContext) -> None:
    spec = ctx.job.spec.train
    if not _runs(ctx):  # an evaluate grid of FaceID groups: nothing to train, nothing to load
        ctx.log.info("train_skipped", reason="no LoRA is used by this job")
        _write_reports(ctx, spec, {}, model_family(ctx.resources.model_ref("base")))
        return
    pipe = ctx.use("base")
    results: dict[str, tuple[LoraRun, TrainingResult]] = {}
    for lora_run in _runs(ctx):
        images = _training_images(ctx, ctx.training_resolution, lora_run.photos)
        if lora_run.is_main:
            target = LoraTarget(ctx.path(layout.LORA_DIR), layout.CHECKPOINT_PREFIX,
                                kohya=lambda alpha, steps, count=int(images.shape[0]): kohya_export(ctx, pipe, spec, alpha, steps, count),
                                snapshots={phase: ctx.path(layout.phase_lora_dir(phase)) for phase in lora_run.snapshots})
        else:
            target = LoraTarget(ctx.path(layout.group_lora_dir(lora_run.name)), layout.group_checkpoint(lora_run.name), run=lora_run.name)
        results[lora_run.name] = (lora_run, train_lora(ctx, pipe, images, spec, target))
    _write_reports(ctx, spec, results, family_of(pipe))


def kohya_file(ctx: StageContext) -> str:
    """lora/<subject>_<job-id>.safetensors: the same LoRA in kohya's format (engine.diffusion.kohya)."""
    from engine.diffusion.kohya import kohya_file_name

    return f"{layout.LORA_DIR}/{kohya_file_name(ctx.job.subject, ctx.job_id)}"


def kohya_export(ctx: StageContext, pipe: Any, spec: TrainSpec, alpha: float, steps: int, images: int) -> tuple[str, dict[str, str]]:
    """The kohya file's name in lora/ and its metadata (engine.diffusion.kohya.kohya_metadata)."""
    from engine.diffusion.kohya import kohya_metadata
    from engine.version import engine_version

    name = Path(kohya_file(ctx)).name
    return name, kohya_metadata(
        family=family_of(pipe), rank=spec.rank, alpha=alpha, resolution=ctx.training_resolution, steps=steps,
        max_steps=spec.max_steps, images=images, output_name=Path(name).stem, trigger=spec.trigger, job_id=ctx.job_id,
        subject=ctx.job.subject, base_model_hashes=ctx.resources.hashes("base"), train_fingerprint=ctx.fingerprint, demo=ctx.demo,
        engine_version=engine_version())


def _training_images(ctx: StageContext, resolution: int, photos: tuple[str, ...] = ()) -> torch.Tensor:
    """The prepared images (base and augmentations) of `photos` (every photo when empty), resized,
    as a N x 3 x R x R tensor in [-1, 1]."""
    from PIL import Image

    tensors = []
    for image in layout.prepared_images(ctx.job_dir):
        if photos and image.photo not in photos:
            continue
        rgb = read_rgb(ctx.path(image.file))
        if rgb.shape[0] != resolution:
            rgb = np.asarray(Image.fromarray(rgb).resize((resolution, resolution), Image.Resampling.LANCZOS))
        tensors.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(tensors)


def _loss_rows(result: TrainingResult) -> str:
    # probe_loss: the loss on the fixed probe set after that step, where it was evaluated (empty elsewhere).
    rows = ["phase,step,phase_step,loss,probe_loss"] + [
        f"{row[0]},{row[1]},{row[2]},{row[3]!r}," + ("" if len(row) < 5 or row[4] is None else repr(row[4])) for row in result.history]
    return "\n".join(rows) + "\n"


def _write_reports(ctx: StageContext, spec: TrainSpec, results: dict[str, tuple[LoraRun, TrainingResult]], family: Family) -> None:
    main = next((result for lora_run, result in results.values() if lora_run.is_main), None)
    info = _main_info(ctx, spec, main, family) if main is not None else {
        "caption": caption(spec), "rank": spec.rank, "resolution": ctx.training_resolution, "max_steps": spec.max_steps, "total_steps": 0,
        "phases": [], "target_modules": list(family.lora_targets), "demo": ctx.demo, "trigger": spec.trigger,
        "main_trained": False, "why": ("nothing this job renders uses its own LoRA (a replicate job of [identity] method \"faceid\" that compares nothing, "
                                        "or an evaluate grid with no phase group and mining off): it was not trained")}
    groups = [(lora_run, result) for lora_run, result in results.values() if not lora_run.is_main]
    if groups:
        info["groups"] = [{"name": lora_run.name, "photos": list(lora_run.photos), "total_steps": result.total_steps, "phases": result.phases,
                           "file": f"{layout.group_lora_dir(lora_run.name)}/{layout.LORA_WEIGHTS}", "loss_file": layout.group_loss_file(lora_run.name)}
                          for lora_run, result in groups]
    if groups or main is None:
        info["steps_all_runs"] = (main.total_steps if main is not None else 0) + sum(result.total_steps for _, result in groups)
    atomic_write_json(ctx.path(layout.TRAIN_INFO), info)
    atomic_write_text(ctx.path(layout.LOSS_FILE), _loss_rows(main) if main is not None else "phase,step,phase_step,loss,probe_loss\n")
    for lora_run, result in groups:
        atomic_write_text(ctx.path(layout.group_loss_file(lora_run.name)), _loss_rows(result))


def _main_info(ctx: StageContext, spec: TrainSpec, main: TrainingResult, family: Family) -> dict[str, Any]:
    """train.json's record of the job's own LoRA (a replicate job's whole train.json)."""
    info: dict[str, Any] = {
        "caption": caption(spec),
        "rank": spec.rank,
        "resolution": ctx.training_resolution,
        "max_steps": spec.max_steps,
        "total_steps": main.total_steps,
        # No resumed_from_step: a resume is run history, not a result. Recorded here it made
        # train.json, and with it verify's and render's fingerprints, the ledger and the
        # manifest, differ from an uninterrupted run's although the LoRA is bit-identical
        # (found by bench/soak.py). The audit log's train_resumed lines record every resume.
        "phases": main.phases,
        "target_modules": list(family.lora_targets),
        "demo": ctx.demo,
        "trigger": spec.trigger,
        # The same LoRA twice: diffusers' format, and kohya's for AUTOMATIC1111/Forge, ComfyUI, InvokeAI, Fooocus.
        "lora_files": {"diffusers": layout.LORA_FILE, "kohya": kohya_file(ctx)},
    }
    if main.snapshots:  # the LoRA at a phase's exit, with that phase's alpha (no training of its own)
        info["snapshots"] = {phase: {**facts, "file": f"{layout.phase_lora_dir(phase)}/{layout.LORA_WEIGHTS}"} for phase, facts in main.snapshots.items()}
    return info
