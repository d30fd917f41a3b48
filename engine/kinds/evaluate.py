"""Kind `evaluate`: prompt x seed x training group against a control, measured like an experiment.

prepare -> embed -> train (the job's LoRA as a replicate job trains it, with the phase snapshots
its groups name, and one LoRA per photo-subset group) -> mine (anchored face mining from the
job's LoRA, with [mine] enabled = true; else nothing) -> evaluate (every cell rendered at fixed
seeds, scored by ArcFace drift and the second model, faces not found counted; engine.measure.evalstats).
This module owns its sections ([train] as replicate's, [evaluate] with [[evaluate.group]], and
[mine]: engine.measure.mining.MineRule), their checks, the LoRAs it trains and the work each stage plans.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import Problem
from engine.fsutil import sha256_file
from engine.kinds.registry import Kind
from engine.kinds.sections import (
    CONTROL_GROUP,
    IDENTITY_METHODS,
    MAX_PHOTOS,
    SAFE_NAME,
    SAFE_NAME_DOC,
    IdentityMethod,
    KindSpec,
    LoraRun,
    TrainSpec,
    inside_folder,
    train_checks,
)
from engine.measure.mining import MineRule
from engine.schema import Bool, Float, Int, ListOf, Str, Table, Tables, rule


FINAL_PHASE = "final"  # evaluate.group.phase: the job's LoRA as its training finished
SHA256_PATTERN = r"(?:[0-9a-f]{64})?"


@dataclass(frozen=True)
class EvaluateGroup(IdentityMethod):
    """One group of an evaluate grid. Its LoRA comes from exactly one of: `photos` (a subset of
    the job's photos: a LoRA of its own, trained with the job's [train] settings), `phase` (the
    job's LoRA as it stood at that phase's exit, or "final": as it finished; no training of its
    own), `file` (a .safetensors LoRA brought in the folder, with its `sha256`). It renders at
    `weight`."""

    name: str = field(default="", metadata=rule(Str(pattern=SAFE_NAME, pattern_doc=SAFE_NAME_DOC)))
    photos: tuple[str, ...] = field(default=(), metadata=rule(ListOf(Str(min_len=1, max_len=255), 0, MAX_PHOTOS)))
    phase: str = field(default="", metadata=rule(Str(max_len=32)))
    file: str = field(default="", metadata=rule(Str(max_len=255)))
    sha256: str = field(default="", metadata=rule(Str(pattern=SHA256_PATTERN, pattern_doc="64 lower-case hex digits (sha256sum's output)")))
    weight: float = field(default=1.0, metadata=rule(Float(0.0, 2.0)))
    # lora: the group's LoRA; faceid: no LoRA, IP-Adapter-FaceID on the subject's reference
    # embedding (models.faceid); lora+faceid: both, FaceID at faceid_scale.
    method: str = field(default="lora", metadata=rule(Str(choices=IDENTITY_METHODS)))
    faceid_scale: float = field(default=1.0, metadata=rule(Float(0.0, 2.0)))

    @property
    def source(self) -> str:
        """What conditions it, in words for the records."""
        faceid = f"FaceID on the reference embedding at scale {self.faceid_scale:g}"
        if not self.uses_lora:
            return faceid
        if self.photos:
            lora = f"photos: {', '.join(self.photos)} (a LoRA of its own)"
        elif self.file:
            lora = f"file: {self.file}"
        else:
            lora = "the job's LoRA as trained" if self.phase == FINAL_PHASE else f"the job's LoRA at the exit of phase {self.phase}"
        return f"{lora} + {faceid}" if self.uses_faceid else lora


@dataclass(frozen=True)
class EvaluateSpec:
    """A grid: every group (and the control) x `prompts` x `seeds`, rendered, embedded, scored."""

    # "{trigger}" stands for train.trigger, as in verify.prompt.
    prompts: tuple[str, ...] = field(default=("a photo of {trigger}, portrait, neutral background", "a photo of {trigger}, side profile, outdoors"),
                                     metadata=rule(ListOf(Str(min_len=1, max_len=1000), 1, 32)))
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3), metadata=rule(ListOf(Int(0, 2**32 - 1), 1, 64)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))
    guidance: float = field(default=5.8, metadata=rule(Float(0.0, 30.0)))
    threshold: float = field(default=0.18, metadata=rule(Float(0.0, 2.0)))  # a cell is "locked" at or below it
    control: bool = field(default=True, metadata=rule(Bool()))
    batch_size: int = field(default=4, metadata=rule(Int(1, 64)))
    group: tuple[EvaluateGroup, ...] = field(default=(EvaluateGroup(name="main", phase=FINAL_PHASE),), metadata=rule(Tables(EvaluateGroup, 1, 8)))


@dataclass(frozen=True, kw_only=True)
class EvaluateJobSpec(KindSpec):
    """An `evaluate` job (this module): trained like a replicate job, then a grid."""

    kind: str = field(default="evaluate", metadata=rule(Str(min_len=1, max_len=64)))
    train: TrainSpec = field(default_factory=TrainSpec, metadata=rule(Table(TrainSpec)))
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec, metadata=rule(Table(EvaluateSpec)))
    mine: MineRule = field(default_factory=MineRule, metadata=rule(Table(MineRule)))


def evaluate_prompts(spec: EvaluateJobSpec) -> list[str]:
    """The grid's prompts, "{trigger}" replaced by train.trigger."""
    return [prompt.replace("{trigger}", spec.train.trigger) for prompt in spec.evaluate.prompts]


def mine_prompt(spec: EvaluateJobSpec) -> str:
    """The prompt mining renders candidates with, "{trigger}" replaced by train.trigger."""
    return spec.mine.prompt.replace("{trigger}", spec.train.trigger)


def evaluate_denied(spec: EvaluateJobSpec) -> list[tuple[str, str]]:
    return ([("train.trigger", spec.train.trigger)] + [(f"evaluate.prompts[{i}]", p) for i, p in enumerate(evaluate_prompts(spec))]
            + ([("mine.prompt", mine_prompt(spec))] if spec.mine.enabled else []))


def evaluate_checks(spec: EvaluateJobSpec, where: str) -> list[Problem]:
    """The training's checks (as a replicate job's), and each group's one source, named once."""
    problems = train_checks(spec.train, where)
    e = spec.evaluate
    phases = [phase.name for phase in spec.train.phases]
    names: dict[str, int] = {}
    photo_sets: dict[tuple[str, ...], int] = {}
    for i, group in enumerate(e.group):
        key = f"{where}: evaluate.group[{i}]"
        if group.name == CONTROL_GROUP:
            problems.append(Problem(f"{key}.name", f"{CONTROL_GROUP!r} is the grid's group without a LoRA (evaluate.control); name the group otherwise"))
        elif group.name in names:
            problems.append(Problem(f"{key}.name", f"{group.name!r} is also the name of evaluate.group[{names[group.name]}]"))
        names.setdefault(group.name, i)
        given = [source for source in ("photos", "phase", "file") if getattr(group, source)]
        if not group.uses_lora:
            if given:
                problems.append(Problem(key, f"a group of method 'faceid' has no LoRA; drop {', '.join(given)} (or use method 'lora+faceid')"))
        elif len(given) != 1:
            problems.append(Problem(key, "give the group's LoRA exactly once: photos (a subset of the job's photos), phase (a phase of [train], or "
                                    f"{FINAL_PHASE!r}) or file (a .safetensors in the folder, with its sha256)" + (f"; it gives {', '.join(given)}" if given else "")))
        if group.phase and group.phase != FINAL_PHASE and group.phase not in phases:
            problems.append(Problem(f"{key}.phase", f"{group.phase!r} is no phase of [train] ({', '.join(phases)}) nor {FINAL_PHASE!r}"))
        if group.file:
            if not group.file.endswith(".safetensors") or Path(group.file).is_absolute() or ".." in Path(group.file).parts:
                problems.append(Problem(f"{key}.file", f"{group.file!r}: a LoRA is a .safetensors file inside the job folder (no pickled formats)"))
            if not group.sha256:
                problems.append(Problem(f"{key}.sha256", f"the sha256 of {group.file!r} is needed (sha256sum {group.file})"))
        elif group.sha256:
            problems.append(Problem(f"{key}.sha256", "only a group with a file has a sha256"))
        if group.photos:
            if len(set(group.photos)) != len(group.photos):
                problems.append(Problem(f"{key}.photos", "a photo is listed twice"))
            photo_set = tuple(sorted(set(group.photos)))
            if photo_set in photo_sets:
                problems.append(Problem(f"{key}.photos", f"the same photos as evaluate.group[{photo_sets[photo_set]}]: it would train the same LoRA"))
            photo_sets.setdefault(photo_set, i)
    if len(set(e.seeds)) != len(e.seeds):
        problems.append(Problem(f"{where}: evaluate.seeds", "seeds must be distinct"))
    if len(set(e.prompts)) != len(e.prompts):
        problems.append(Problem(f"{where}: evaluate.prompts", "a prompt is listed twice"))
    m = spec.mine
    for low, high in (("k_min", "k_start"), ("start_bound", "max_bound"), ("target", "budget"), ("batch", "max_batch")):
        if getattr(m, low) > getattr(m, high):
            problems.append(Problem(f"{where}: mine.{low}", f"{getattr(m, low)} is above mine.{high} {getattr(m, high)}"))
    return problems


def evaluate_folder_checks(spec: EvaluateJobSpec, folder: Path, photos: tuple[str, ...], where: str) -> list[Problem]:
    """Each photo-subset group names photos of this job, and not all of them; each brought LoRA is
    a file of the folder with the sha256 job.toml gives (checked again before it is loaded)."""
    problems: list[Problem] = []
    for i, group in enumerate(spec.evaluate.group):
        key = f"{where}: evaluate.group[{i}]"
        for j, name in enumerate(group.photos):
            if name not in photos:
                problems.append(Problem(f"{key}.photos[{j}]", f"{name!r} is not one of the job's photos ({', '.join(photos)})"))
        if group.photos and set(group.photos) >= set(photos):
            problems.append(Problem(f"{key}.photos", f"every photo of the job: that is the job's own LoRA; use phase = {FINAL_PHASE!r}"))
        if group.file:
            path = folder / group.file
            if not inside_folder(path, folder.resolve()) or not path.is_file():
                problems.append(Problem(f"{key}.file", f"{group.file!r} is not a file in the job folder"))
            elif group.sha256 and (actual := sha256_file(path)) != group.sha256:
                problems.append(Problem(f"{key}.sha256", f"{group.file!r} has sha256 {actual}, not {group.sha256}; bring the file job.toml names, "
                                        "or correct the hash"))
            elif reason := _not_a_lora(path):
                problems.append(Problem(f"{key}.file", f"{group.file!r} {reason}"))
    return problems


def _not_a_lora(path: Path) -> str:
    """Why a .safetensors file cannot be a LoRA, from its header alone ("" when it may be one;
    loading it into the base model is the evaluate stage's check)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if length is None or length > 100 * 1024 * 1024:
                return "is not a safetensors file (no header)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError):
        return "is not a safetensors file (its header does not parse)"
    if not isinstance(header, dict) or not any("lora" in key for key in header if key != "__metadata__"):
        return "holds no LoRA weights (no tensor name contains 'lora'); bring a LoRA in diffusers' or kohya's format"
    return ""


def evaluate_lora_runs(spec: EvaluateJobSpec) -> tuple[LoraRun, ...]:
    """The job's LoRA with the snapshots its groups name (in [train]'s phase order) when a group
    or mining uses it, and one LoRA per photo-subset group. A grid of FaceID groups (and brought
    files) trains nothing: FaceID is the zero-shot mode."""
    named = {group.phase for group in spec.evaluate.group if group.phase and group.phase != FINAL_PHASE}
    main_used = spec.mine.enabled or any(group.phase and group.uses_lora for group in spec.evaluate.group)
    main = (LoraRun(snapshots=tuple(phase.name for phase in spec.train.phases if phase.name in named)),) if main_used else ()
    return main + tuple(LoraRun(group.name, group.photos) for group in spec.evaluate.group if group.photos and group.uses_lora)


def planned_work(spec: EvaluateJobSpec, stage: str) -> int | None:
    """Training steps (the cap, for each LoRA it trains), mining candidates (the budget: mining
    stops at its target) and grid cells (every group and the control x prompts x seeds)."""
    if stage == "train":
        return spec.train.max_steps * len(evaluate_lora_runs(spec))
    if stage == "mine":
        return spec.mine.budget if spec.mine.enabled else 0
    if stage == "evaluate":
        e = spec.evaluate
        return (len(e.group) + (1 if e.control else 0)) * len(e.prompts) * len(e.seeds)
    return None


def _lora_files(spec: EvaluateJobSpec) -> tuple[str, ...]:
    return tuple(group.file for group in spec.evaluate.group if group.file)


EVALUATE = Kind(
    name="evaluate",
    stages=("prepare", "embed", "train", "mine", "evaluate"),
    spec=EvaluateJobSpec,
    report=("evaluate_summary", "timeline", "evaluate_charts", "evaluate_sheets", "evaluate_table", "mine", "training", "settings", "audit"),
    prompts=evaluate_denied,
    checks=evaluate_checks,
    folder_checks=evaluate_folder_checks,
    named_files=_lora_files,
    lora_runs=evaluate_lora_runs,
    planned_work=planned_work,
    progress=(("train", "step"), ("mine", "candidate"), ("evaluate", "cell")),
    config_defaults=("prepare", "train"),
    title="Evaluation report",
    summary="prompts x fixed seeds x training groups (photo subsets, phase snapshots, brought LoRAs) against a control, scored and tested",
)
