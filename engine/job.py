"""job.toml -> a frozen, validated spec of its kind (`KindSpec`; `JobSpec` for replicate), with every
problem reported at once.

Defaults come from config.toml's `[job.*]` tables (see `engine.config`), which come from the
dataclass defaults below. Deeper code trusts a JobSpec: ranges, types, photo paths and
prompts have all been checked here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import JobError, Problem
from engine.fsutil import TreeLimit, sha256_file, utf8_safe, walk_tree
from engine.schema import (
    INVALID,
    Bool,
    Either,
    Float,
    Int,
    ListOf,
    MapOf,
    Str,
    Tables,
    Table,
    build,
    key_text,
    merge_tables,
    rule,
)

JOB_FILE = "job.toml"
MAX_PHOTOS = 3
MAX_JOB_FILE_BYTES = 256 * 1024
MAX_NESTING = 32  # tables/arrays inside each other; a real job needs 4
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SAFE_NAME_DOC = "use 1-64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"


@dataclass(frozen=True)
class SubjectSpec:
    name: str = field(default="", metadata=rule(Str(pattern=SAFE_NAME, pattern_doc=SAFE_NAME_DOC)))
    photos: tuple[str, ...] = field(default=(), metadata=rule(ListOf(Str(min_len=1, max_len=255), 0, 16)))
    # "auto": the largest face, refused when another face is nearly as large;
    # "largest": the largest face, whatever else is in the photo.
    face: str = field(default="auto", metadata=rule(Str(choices=("auto", "largest"))))
    # photo file name -> face number, counted left to right from 0 (overrides `face`).
    face_index: tuple[tuple[str, int], ...] = field(default=(), metadata=rule(MapOf(Int(0, 99))))


@dataclass(frozen=True)
class PrepareSpec:
    size: int = field(default=768, metadata=rule(Int(64, 2048)))
    remove_background: bool = field(default=True, metadata=rule(Bool()))
    rotations: tuple[float, ...] = field(default=(-10.0, 10.0), metadata=rule(ListOf(Float(-45, 45), 0, 8)))
    crops: tuple[float, ...] = field(default=(0.8, 0.6), metadata=rule(ListOf(Float(0.3, 1.0), 0, 8)))
    # Crop side = face box side x (1 + 2 x padding): 0.8 keeps head, hair and shoulders.
    padding: float = field(default=0.8, metadata=rule(Float(0.1, 3.0)))


@dataclass(frozen=True)
class PhaseSpec:
    name: str = field(default="", metadata=rule(Str(pattern=r"[A-Z][A-Z0-9_]{0,31}", pattern_doc="upper-case name like MID_FINE")))
    lr: float = field(default=1e-4, metadata=rule(Float(0.0, 1.0, low_open=True)))
    alpha: float = field(default=8.0, metadata=rule(Float(0.0, 1024.0, low_open=True)))
    loss: str = field(default="mse", metadata=rule(Str(choices=("mse", "huber", "charbonnier"))))
    optimizer: str = field(default="adamw", metadata=rule(Str(choices=("adamw", "adamp"))))
    min_steps: int = field(default=20, metadata=rule(Int(0, 100_000)))
    max_steps: int = field(default=400, metadata=rule(Int(1, 100_000)))


DEFAULT_PHASES = (
    PhaseSpec("COARSE", 1e-4, 8.0, "mse", "adamw", 50, 400),
    PhaseSpec("MID", 3e-5, 4.0, "huber", "adamw", 50, 400),
    PhaseSpec("MID_FINE", 1e-6, 2.0, "charbonnier", "adamp", 30, 200),  # 30: the first step the convergence test judges
    PhaseSpec("FINAL_FINE", 5e-7, 1.0, "charbonnier", "adamp", 30, 200),
)


@dataclass(frozen=True)
class TrainSpec:
    rank: int = field(default=8, metadata=rule(Int(1, 256)))
    max_steps: int = field(default=1200, metadata=rule(Int(1, 100_000)))  # hard cap over all phases
    phases: tuple[PhaseSpec, ...] = field(default=DEFAULT_PHASES, metadata=rule(Tables(PhaseSpec, 1, 8)))
    resolution: int = field(default=512, metadata=rule(Int(32, 2048)))
    batch_size: int = field(default=1, metadata=rule(Int(1, 64)))
    seed: int = field(default=0, metadata=rule(Int(0, 2**32 - 1)))
    checkpoint_every: int = field(default=50, metadata=rule(Int(1, 100_000)))
    # Steps whose losses stay on the device before they are read to the host at once and fed to the
    # convergence test (a read per step stalls a GPU's queue). 1: every step, as before; a phase exit
    # is then seen at the end of its block (the step it fired at is recorded). Blocks also end at a
    # checkpoint, a phase's max_steps and the total cap.
    sync_every: int = field(default=1, metadata=rule(Int(1, 1000)))
    # Convergence (engine/convergence.py). improvement_bound: the loss on a fixed probe set of
    # `probe_size` (latent, noise, timestep) tuples, evaluated every `probe_every` steps; a phase has
    # converged when the upper `convergence_confidence` bound of its improvement over the next
    # `convergence_horizon` steps, from the slope of the probe losses of the last `plateau_window`
    # steps, is at most `convergence_epsilon` x their level (and diverges when the lower bound of
    # the rise is above it). no_visible_trend: the older rule, kept for comparison: the per-step
    # loss's slope over `plateau_window` steps has a p-value above `plateau_p_value`.
    convergence: str = field(default="improvement_bound", metadata=rule(Str(choices=("improvement_bound", "no_visible_trend"))))
    plateau_window: int = field(default=100, metadata=rule(Int(3, 10_000)))
    plateau_p_value: float = field(default=0.2, metadata=rule(Float(0.0, 0.999, low_open=True)))
    probe_size: int = field(default=8, metadata=rule(Int(1, 64)))
    probe_every: int = field(default=10, metadata=rule(Int(1, 1000)))
    convergence_horizon: int = field(default=100, metadata=rule(Int(1, 100_000)))
    convergence_epsilon: float = field(default=0.01, metadata=rule(Float(0.0, 1.0, low_open=True)))
    convergence_confidence: float = field(default=0.95, metadata=rule(Float(0.5, 0.9999, low_open=True)))
    trigger: str = field(default="sks person", metadata=rule(Str(min_len=1, max_len=64)))


@dataclass(frozen=True)
class VerifySpec:
    # A count of candidates (seeds base_seed, base_seed+1, ...) or an explicit list.
    seeds: int | tuple[int, ...] = field(
        default=16,
        metadata=rule(Either(Int(1, 256), ListOf(Int(0, 2**32 - 1), 1, 256), doc="a count 1-256 or a list of seeds")),
    )
    base_seed: int = field(default=0, metadata=rule(Int(0, 2**32 - 1)))
    threshold: float = field(default=0.18, metadata=rule(Float(0.0, 2.0)))
    # "{trigger}" stands for train.trigger (engine.job.verify_prompt), so a custom trigger is the one verified.
    prompt: str = field(default="a photo of {trigger}, portrait, neutral background", metadata=rule(Str(min_len=1, max_len=1000)))
    batch_size: int = field(default=4, metadata=rule(Int(1, 64)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))

    @property
    def seed_list(self) -> tuple[int, ...]:
        if isinstance(self.seeds, int):
            return tuple(self.base_seed + i for i in range(self.seeds))
        return self.seeds


CONTROL_GROUP = "control"  # seed discovery's and the evaluate grid's group with no adapter: never a group's name


@dataclass(frozen=True)
class RenderSpec:
    prompt: str = field(metadata=rule(Str(min_len=1, max_len=1000)))
    mode: str = field(default="three_pass", metadata=rule(Str(choices=("three_pass", "two_pass"))))
    count: int = field(default=1, metadata=rule(Int(1, 64)))
    negative_prompt: str = field(default="", metadata=rule(Str(max_len=1000)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))


IDENTITY_METHODS = ("lora", "faceid", "lora+faceid")


class _Method:
    """What a `method` field (one of IDENTITY_METHODS) asks for."""

    method: str

    @property
    def uses_lora(self) -> bool:
        return self.method != "faceid"

    @property
    def uses_faceid(self) -> bool:
        return "faceid" in self.method


@dataclass(frozen=True)
class IdentitySpec(_Method):
    """How a replicate job conditions its renders on the subject. lora: the LoRA it trains;
    faceid: IP-Adapter-FaceID on the subject's reference ArcFace embedding (models.faceid), no
    training (the zero-shot mode); lora+faceid: both. Render passes scale FaceID as they scale
    the LoRA (faceid_scale x the pass's LoRA weight). `compare`: seed discovery also renders the
    other methods on the same seeds (LoRA, FaceID, both, and the control), which trains the LoRA
    even for method faceid."""

    method: str = field(default="lora", metadata=rule(Str(choices=IDENTITY_METHODS)))
    faceid_scale: float = field(default=1.0, metadata=rule(Float(0.0, 2.0)))
    compare: bool = field(default=False, metadata=rule(Bool()))

    @property
    def verify_groups(self) -> tuple[str, ...]:
        """The groups seed discovery renders at every seed, the job's method first (its drift
        ranks the seeds), the control (no adapter at all) last."""
        others = tuple(m for m in IDENTITY_METHODS if m != self.method) if self.compare else ()
        return (self.method,) + others + (CONTROL_GROUP,)

    @property
    def verify_uses_faceid(self) -> bool:
        return any("faceid" in group for group in self.verify_groups)

    @property
    def trains(self) -> bool:
        """Whether the job's LoRA is trained: its method uses it, or compare renders it."""
        return self.uses_lora or self.compare


@dataclass(frozen=True, kw_only=True)
class KindSpec:
    """What every kind's job.toml has: its kind (engine.kinds), who the subject is, how the photos
    are prepared. A kind's spec subclasses this with its own sections. `subject.name` and
    `subject.photos` are always filled in once loaded."""

    kind: str = field(default="replicate", metadata=rule(Str(min_len=1, max_len=64)))
    subject: SubjectSpec = field(default_factory=SubjectSpec, metadata=rule(Table(SubjectSpec)))
    prepare: PrepareSpec = field(default_factory=PrepareSpec, metadata=rule(Table(PrepareSpec)))


@dataclass(frozen=True, kw_only=True)
class JobSpec(KindSpec):
    """A `replicate` job (engine.kinds.replicate): trained, verified, rendered."""

    render: tuple[RenderSpec, ...] = field(metadata=rule(Tables(RenderSpec, 1, 16)))
    train: TrainSpec = field(default_factory=TrainSpec, metadata=rule(Table(TrainSpec)))
    verify: VerifySpec = field(default_factory=VerifySpec, metadata=rule(Table(VerifySpec)))
    identity: IdentitySpec = field(default_factory=IdentitySpec, metadata=rule(Table(IdentitySpec)))


RETOUCH_REGIONS = ("forehead", "under_eye", "smile_lines", "chin")  # engine.regions.REGIONS (kept light here)


@dataclass(frozen=True)
class RetouchCaps:
    """The highest inpainting strength each region takes: a strength above it is refused, never clamped."""

    forehead: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))
    under_eye: float = field(default=0.28, metadata=rule(Float(0.0, 1.0, low_open=True)))
    smile_lines: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))
    chin: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))


@dataclass(frozen=True)
class RetouchAccept:
    """When a variant is accepted (engine.measures.AcceptLimits)."""

    max_drift: float = field(default=0.05, metadata=rule(Float(0.0, 2.0)))
    texture_min: float = field(default=0.70, metadata=rule(Float(0.0, 10.0)))
    texture_max: float = field(default=1.30, metadata=rule(Float(0.0, 10.0)))
    max_delta_e: float = field(default=2.0, metadata=rule(Float(0.0, 100.0)))
    max_landmark_shift: float = field(default=0.03, metadata=rule(Float(0.0, 1.0)))  # IOD


@dataclass(frozen=True)
class RetouchSpec:
    """A retouch sweep: every region set (each region alone, and all of them together with
    `combine`) x `strengths` x `seeds`, inpainted, pasted into the original photo and measured."""

    regions: tuple[str, ...] = field(default=RETOUCH_REGIONS, metadata=rule(ListOf(Str(choices=RETOUCH_REGIONS), 1, 4)))
    combine: bool = field(default=True, metadata=rule(Bool()))
    # parallel: each region inpainted from the original, then combined; sequential: one after another.
    compositing: str = field(default="parallel", metadata=rule(Str(choices=("parallel", "sequential"))))
    strengths: tuple[float, ...] = field(default=(0.18, 0.22, 0.26), metadata=rule(ListOf(Float(0.0, 1.0, low_open=True), 1, 16)))
    seeds: tuple[int, ...] = field(default=(0, 1), metadata=rule(ListOf(Int(0, 2**32 - 1), 1, 16)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))
    guidance: float = field(default=5.0, metadata=rule(Float(0.0, 30.0)))
    resolution: int = field(default=512, metadata=rule(Int(64, 2048)))  # the model's side, px (the demo model: its own 128)
    prompt: str = field(default="a close-up photo of a face, natural skin, fine skin texture, soft light", metadata=rule(Str(min_len=1, max_len=1000)))
    negative_prompt: str = field(default="plastic skin, airbrushed, blurry, makeup", metadata=rule(Str(max_len=1000)))
    min_skin: float = field(default=0.5, metadata=rule(Float(0.0, 1.0)))  # a region keeping less of its area is not_applicable
    masks: tuple[tuple[str, str], ...] = field(default=(), metadata=rule(MapOf(Str(min_len=1, max_len=255))))  # region -> a PNG in the folder
    caps: RetouchCaps = field(default_factory=RetouchCaps, metadata=rule(Table(RetouchCaps)))
    accept: RetouchAccept = field(default_factory=RetouchAccept, metadata=rule(Table(RetouchAccept)))

    def denoising_steps(self, strength: float) -> int:
        """The steps an inpainting call at `strength` really denoises (diffusers: int(steps x strength))."""
        return int(self.steps * strength)


@dataclass(frozen=True, kw_only=True)
class RetouchJobSpec(KindSpec):
    """A `retouch` job (engine.kinds.retouch): one photo, region-masked inpainting sweeps."""

    kind: str = field(default="retouch", metadata=rule(Str(min_len=1, max_len=64)))
    retouch: RetouchSpec = field(default_factory=RetouchSpec, metadata=rule(Table(RetouchSpec)))


def retouch_checks(spec: RetouchJobSpec, where: str) -> list[Problem]:
    """Strengths above a region's cap, strengths that denoise the same number of steps (identical
    images under two names) or none, mask overrides for regions not swept, repeated seeds."""
    problems: list[Problem] = []
    r = spec.retouch
    caps = {name: getattr(r.caps, name) for name in RETOUCH_REGIONS}
    seen: dict[int, int] = {}
    for i, strength in enumerate(r.strengths):
        key = f"{where}: retouch.strengths[{i}]"
        over = [name for name in r.regions if strength > caps[name]]
        steps = r.denoising_steps(strength)
        if over:
            problems.append(Problem(key, f"{strength} is above the cap of {', '.join(over)} ("
                                    + ", ".join(f"retouch.caps.{name} = {caps[name]}" for name in over) + "); lower it, or raise the cap"))
        elif steps == 0:
            problems.append(Problem(key, f"{strength} x retouch.steps {r.steps} denoises no step at all; raise the strength or the steps"))
        elif steps in seen:
            j = seen[steps]
            problems.append(Problem(key, f"{strength} denoises the same {steps} steps as retouch.strengths[{j}] = {r.strengths[j]} at retouch.steps = "
                                    f"{r.steps}: their images would be identical; drop one or change the steps"))
        seen.setdefault(steps, i)
    if len(set(r.regions)) != len(r.regions):
        problems.append(Problem(f"{where}: retouch.regions", "a region is listed twice"))
    if len(set(r.seeds)) != len(r.seeds):
        problems.append(Problem(f"{where}: retouch.seeds", "seeds must be distinct"))
    for name, file in r.masks:
        if name not in r.regions:
            problems.append(Problem(f"{where}: retouch.masks.{key_text(name)}", f"names no region of retouch.regions ({', '.join(r.regions)})"))
        elif not file.lower().endswith(".png") or Path(file).is_absolute() or ".." in Path(file).parts:
            problems.append(Problem(f"{where}: retouch.masks.{key_text(name)}", f"{file!r}: a mask is a .png file inside the job folder"))
    if r.accept.texture_min > r.accept.texture_max:
        problems.append(Problem(f"{where}: retouch.accept.texture_min", f"{r.accept.texture_min} is above texture_max {r.accept.texture_max}"))
    return problems


def retouch_prompts(spec: RetouchJobSpec) -> list[tuple[str, str]]:
    return [("retouch.prompt", spec.retouch.prompt)]


@dataclass(frozen=True)
class RestoreSpec:
    """A restoration: the damage mask's file, optional undamaged references of the same person,
    K seeds, and where it stops (engine.coverage's limits: shares 0-1, crossed when above)."""

    # The damage: `mask`, a PNG in the job folder (white = damaged, the photo's size); or `painted`,
    # a copy of the photo (PNG) with the damage painted over in the colour `key` (within key_tolerance).
    mask: str = field(default="", metadata=rule(Str(max_len=255)))
    painted: str = field(default="", metadata=rule(Str(max_len=255)))
    key: tuple[int, ...] = field(default=(255, 0, 255), metadata=rule(ListOf(Int(0, 255), 3, 3)))
    key_tolerance: int = field(default=8, metadata=rule(Int(0, 128)))
    references: tuple[str, ...] = field(default=(), metadata=rule(ListOf(Str(min_len=1, max_len=255), 0, 8)))
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3), metadata=rule(ListOf(Int(0, 2**32 - 1), 1, 16)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))
    strength: float = field(default=1.0, metadata=rule(Float(0.0, 1.0, low_open=True)))
    guidance: float = field(default=5.0, metadata=rule(Float(0.0, 30.0)))
    resolution: int = field(default=512, metadata=rule(Int(64, 2048)))  # the model's side, px (the demo model: its own 128)
    prompt: str = field(default="a restored photo of a face, natural skin, sharp details", metadata=rule(Str(min_len=1, max_len=1000)))
    negative_prompt: str = field(default="scratches, damage, blurry, deformed", metadata=rule(Str(max_len=1000)))
    grow_px: int = field(default=3, metadata=rule(Int(0, 64)))  # the mask is grown by this before inpainting and pasting
    flag_face: float = field(default=0.15, metadata=rule(Float(0.0, 1.0)))
    flag_feature: float = field(default=0.15, metadata=rule(Float(0.0, 1.0)))
    flag_any_feature: float = field(default=0.50, metadata=rule(Float(0.0, 1.0)))
    refuse_face: float = field(default=0.25, metadata=rule(Float(0.0, 1.0)))
    refuse_feature: float = field(default=0.20, metadata=rule(Float(0.0, 1.0)))
    # fail: a refusal goes to failed/ (restore_mask_too_large); classical: the TELEA fill alone is
    # delivered instead, labelled non-generative.
    on_refuse: str = field(default="fail", metadata=rule(Str(choices=("fail", "classical"))))
    drift_margin: float = field(default=0.05, metadata=rule(Float(0.0, 2.0)))  # a variant may be this much farther from the references than the damaged photo


@dataclass(frozen=True, kw_only=True)
class RestoreJobSpec(KindSpec):
    """A `restore` job (engine.kinds.restore): one damaged photo, its mask, optional references."""

    kind: str = field(default="restore", metadata=rule(Str(min_len=1, max_len=64)))
    restore: RestoreSpec = field(metadata=rule(Table(RestoreSpec)))


def restore_checks(spec: RestoreJobSpec, where: str) -> list[Problem]:
    problems: list[Problem] = []
    r = spec.restore
    if bool(r.mask) == bool(r.painted):
        problems.append(Problem(f"{where}: restore.mask", "name the damage once: restore.mask (a PNG, white = damaged) or restore.painted "
                                "(a copy of the photo with the damage painted in restore.key)" + (", not both" if r.mask else "")))
    damage = [("restore.mask", r.mask)] if r.mask else [("restore.painted", r.painted)] if r.painted else []
    for key, file in damage + [(f"restore.references[{i}]", name) for i, name in enumerate(r.references)]:
        if Path(file).is_absolute() or ".." in Path(file).parts:
            problems.append(Problem(f"{where}: {key}", f"{file!r}: name a file inside the job folder"))
    for key, file in damage:
        if not file.lower().endswith(".png"):
            problems.append(Problem(f"{where}: {key}", f"{file!r}: a damage mask or painted copy is a .png file (lossless)"))
    if len(set(r.seeds)) != len(r.seeds):
        problems.append(Problem(f"{where}: restore.seeds", "seeds must be distinct"))
    if (r.mask or r.painted) in r.references:
        problems.append(Problem(f"{where}: restore.references", f"{r.mask or r.painted!r} is the damage mask"))
    for flag, refuse in (("flag_face", "refuse_face"), ("flag_feature", "refuse_feature")):
        if getattr(r, flag) > getattr(r, refuse):
            problems.append(Problem(f"{where}: restore.{flag}", f"{getattr(r, flag)} is above restore.{refuse} {getattr(r, refuse)}"))
    if int(r.steps * r.strength) == 0:
        problems.append(Problem(f"{where}: restore.strength", f"{r.strength} x restore.steps {r.steps} denoises no step at all"))
    return problems


def restore_prompts(spec: RestoreJobSpec) -> list[tuple[str, str]]:
    return [("restore.prompt", spec.restore.prompt)]


@dataclass(frozen=True)
class LoraRun:
    """One LoRA the train stage trains (engine.kinds.Kind.lora_runs). `name` "" is the job's own
    LoRA, on every photo; a group's LoRA has its name and a subset of the photos. `snapshots`:
    phases whose LoRA is kept as it stood at their exit (no extra training step)."""

    name: str = ""
    photos: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.name == ""


FINAL_PHASE = "final"  # evaluate.group.phase: the job's LoRA as its training finished
SHA256_PATTERN = r"(?:[0-9a-f]{64})?"
@dataclass(frozen=True)
class EvaluateGroup(_Method):
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


@dataclass(frozen=True)
class MineSpec:
    """Anchored face mining from the job's LoRA (engine.mining, stage mine). Off unless `enabled`.
    The anchor (`anchor_max_drift` to the real subject's reference) cannot be switched off: mining
    that is not anchored to a real subject is not offered."""

    enabled: bool = field(default=False, metadata=rule(Bool()))
    prompt: str = field(default="a photo of {trigger}, portrait, neutral background", metadata=rule(Str(min_len=1, max_len=1000)))
    base_seed: int = field(default=1000, metadata=rule(Int(0, 2**32 - 1)))
    lora_weight: float = field(default=1.0, metadata=rule(Float(0.0, 2.0, low_open=True)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))
    guidance: float = field(default=5.8, metadata=rule(Float(0.0, 30.0)))
    target: int = field(default=12, metadata=rule(Int(1, 256)))  # members: mining stops when the group has them
    budget: int = field(default=64, metadata=rule(Int(1, 4096)))  # candidates at most
    batch: int = field(default=4, metadata=rule(Int(1, 64)))  # the first batch; each next one `growth` times larger
    growth: float = field(default=2.0, metadata=rule(Float(1.0, 8.0)))
    max_batch: int = field(default=16, metadata=rule(Int(1, 64)))
    anchor_max_drift: float = field(default=0.4, metadata=rule(Float(0.0, 1.0, low_open=True)))
    start_bound: float = field(default=0.35, metadata=rule(Float(0.0, 2.0, low_open=True)))
    max_bound: float = field(default=0.6, metadata=rule(Float(0.0, 2.0, low_open=True)))
    min_group: int = field(default=3, metadata=rule(Int(2, 64)))
    k_start: float = field(default=2.0, metadata=rule(Float(0.0, 10.0)))
    k_min: float = field(default=0.5, metadata=rule(Float(0.0, 10.0)))
    k_step: float = field(default=0.1, metadata=rule(Float(0.0, 10.0)))
    relax: float = field(default=0.1, metadata=rule(Float(0.0, 1.0)))
    prune_k: float = field(default=3.0, metadata=rule(Float(0.0, 100.0, low_open=True)))


@dataclass(frozen=True, kw_only=True)
class EvaluateJobSpec(KindSpec):
    """An `evaluate` job (engine.kinds.evaluate): trained like a replicate job, then a grid."""

    kind: str = field(default="evaluate", metadata=rule(Str(min_len=1, max_len=64)))
    train: TrainSpec = field(default_factory=TrainSpec, metadata=rule(Table(TrainSpec)))
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec, metadata=rule(Table(EvaluateSpec)))
    mine: MineSpec = field(default_factory=MineSpec, metadata=rule(Table(MineSpec)))


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
    problems = _phase_checks(spec.train, where) + _convergence_checks(spec.train, where)
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
            if not _inside(path, folder.resolve()) or not path.is_file():
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
    import json
    import struct

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


# The sections of a job that config.toml may give defaults for ([job.<section>]).
JOB_DEFAULT_SECTIONS = {"prepare": PrepareSpec, "train": TrainSpec, "verify": VerifySpec, "identity": IdentitySpec}


def read_toml(path: Path, where: str, max_bytes: int = MAX_JOB_FILE_BYTES) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can be wrong into a JobError naming the file."""
    try:
        # O_NONBLOCK: a FIFO named job.toml must be refused, not block the daemon forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobError("missing_job_file", f"{where} is missing: every job folder needs one") from None
    except OSError as exc:
        raise JobError("invalid_job", f"{where} cannot be read ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise JobError("invalid_job", f"{where} is not a regular file ({_file_kind(info.st_mode)})")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise JobError("invalid_job", f"{where} is {info.st_size} bytes; at most {max_bytes} are accepted")
        data = handle.read(max_bytes + 1)  # it may still be growing (a copy in progress)
    if len(data) > max_bytes:
        raise JobError("invalid_job", f"{where} is over {max_bytes} bytes; at most {max_bytes} are accepted")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError("invalid_job", f"{where} is not UTF-8 text (byte {exc.start})") from None
    # tomllib takes time quadratic in the parts of one dotted key (60,000 parts: minutes), and
    # anything past MAX_NESTING parts is refused below anyway: refuse it before parsing.
    if deep := _DEEP_DOTTED_KEY.search(text):
        line = text.count("\n", 0, deep.start()) + 1
        raise JobError("invalid_job", f"{where} line {line}: a dotted key of more than {MAX_NESTING} parts nests too deeply")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError("invalid_job", f"{where} is not valid TOML: {exc}") from None
    except RecursionError:
        raise JobError("invalid_job", f"{where} nests too deeply to parse") from None
    # Dotted keys (a.a.a... = 1) nest without recursing in the parser, but every later
    # walk (validation, repr in messages) would recurse: refuse them here.
    if _nesting_depth(table, MAX_NESTING) > MAX_NESTING:
        raise JobError("invalid_job", f"{where} nests tables or arrays more than {MAX_NESTING} levels deep")
    return table


# One TOML key part (bare, "basic" or 'literal'), and a chain of more than MAX_NESTING of them
# joined by dots. Possessive quantifiers and the look-behind keep the search linear in the text.
# It may also match inside a string value (33 dot-joined words): no prompt looks like that.
_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_DEEP_DOTTED_KEY = re.compile(rf"(?<![A-Za-z0-9_-]){_KEY_PART}(?:[ \t]*+\.[ \t]*+{_KEY_PART}){{{MAX_NESTING},}}+")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "not a plain file"


def _nesting_depth(value: Any, limit: int) -> int:
    """How deep tables/arrays nest (a scalar is 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def parse_job_table(
    table: dict[str, Any],
    defaults: dict[str, Any],
    folder_name: str,
    where: str = JOB_FILE,
) -> tuple[KindSpec | None, list[Problem]]:
    """Merge config defaults under the job's table and validate it as its kind's spec (engine.kinds);
    returns (spec, problems). Defaults apply to the kind's own sections only; a section of
    another kind is refused, naming it and its kind."""
    from engine.kinds import DEFAULT_KIND, known_kinds, kind_named, sections_of_other_kinds

    problems: list[Problem] = []
    name = table.get("kind", DEFAULT_KIND)
    if not isinstance(name, str) or name not in known_kinds():
        return None, [Problem(f"{where}: kind", f"{name!r:.80} is not a job kind; known kinds: {', '.join(known_kinds())}")]
    kind = kind_named(name)
    foreign = sections_of_other_kinds(kind)
    for key in table:
        if key in foreign:
            owners = " and ".join(repr(owner) for owner in foreign[key])
            problems.append(Problem(f"{where}: {key_text(key)}", f"belongs to kind {owners}, not to this job's kind {kind.name!r} "
                                    f"(its sections: {', '.join(kind.sections)})"))
    table = {key: value for key, value in table.items() if key not in foreign}
    merged = merge_tables({k: v for k, v in defaults.items() if k != "render" and k in kind.sections}, table)
    render_defaults = defaults.get("render", {})
    if "render" in kind.sections and isinstance(merged.get("render"), list):
        merged["render"] = [
            merge_tables(render_defaults, entry) if isinstance(entry, dict) else entry for entry in merged["render"]
        ]
    spec_problems: list[Problem] = []
    spec = build(kind.spec, merged, "", spec_problems)
    problems += [Problem(f"{where}: {p.where}", p.reason) for p in spec_problems]
    if spec is INVALID:
        return None, problems
    if not spec.subject.name and not re.fullmatch(SAFE_NAME, folder_name):
        problems.append(
            Problem(f"{where}: subject.name", f"the folder name {folder_name!r:.80} is not a safe subject name; set subject.name ({SAFE_NAME_DOC})")
        )
    problems += kind.checks(spec, where)
    return spec, problems


def replicate_lora_runs(spec: JobSpec) -> tuple[LoraRun, ...]:
    """The job's LoRA, unless it renders with FaceID alone and compares nothing (nothing to train)."""
    return (LoraRun(),) if spec.identity.trains else ()


def replicate_checks(spec: JobSpec, where: str) -> list[Problem]:
    """A replicate job's checks between keys (engine.kinds.replicate)."""
    problems = _phase_checks(spec.train, where) + _convergence_checks(spec.train, where)
    seeds = spec.verify.seed_list
    if len(set(seeds)) != len(seeds):
        problems.append(Problem(f"{where}: verify.seeds", "seeds must be distinct"))
    return problems


def _phase_checks(train: TrainSpec, where: str) -> list[Problem]:
    problems: list[Problem] = []
    names = [p.name for p in train.phases]
    for i, phase in enumerate(train.phases):
        if phase.min_steps > phase.max_steps:
            problems.append(Problem(f"{where}: train.phases[{i}].min_steps", f"{phase.min_steps} is above max_steps {phase.max_steps}"))
        if names.count(phase.name) > 1:
            problems.append(Problem(f"{where}: train.phases[{i}].name", f"phase name {phase.name!r} is used twice"))
    if train.rank > 0 and not train.phases:
        problems.append(Problem(f"{where}: train.phases", "at least one phase is needed"))
    return problems


def _convergence_checks(train: TrainSpec, where: str) -> list[Problem]:
    """Settings under which a phase could never exit by convergence, or a min_steps that never
    acts: refused, not silently run to the step cap."""
    problems: list[Problem] = []
    if train.convergence == "improvement_bound":
        first_judged = 3 * train.probe_every  # the slope's error needs 3 probe losses
        if train.plateau_window // train.probe_every < 3:
            problems.append(Problem(f"{where}: train.plateau_window", f"{train.plateau_window} steps hold {train.plateau_window // train.probe_every} "
                                    f"probe losses at one every {train.probe_every} steps; the convergence test needs at least 3 "
                                    f"(plateau_window >= {first_judged})"))
    else:
        first_judged = train.plateau_window
    for i, phase in enumerate(train.phases):
        if phase.max_steps < first_judged:
            problems.append(Problem(f"{where}: train.phases[{i}].max_steps", f"phase {phase.name}: {phase.max_steps} steps end before the "
                                    f"convergence test first judges (step {first_judged}), so it could only stop at its cap"))
        elif 0 < phase.min_steps < first_judged:
            problems.append(Problem(f"{where}: train.phases[{i}].min_steps", f"phase {phase.name}: min_steps {phase.min_steps} never acts, as the "
                                    f"convergence test first judges at step {first_judged}; set 0 or at least {first_judged}"))
    return problems


def verify_prompt(spec: JobSpec) -> str:
    """The prompt seed discovery renders: verify.prompt with "{trigger}" replaced by train.trigger."""
    return spec.verify.prompt.replace("{trigger}", spec.train.trigger)


def replicate_prompts(spec: JobSpec) -> list[tuple[str, str]]:
    """Every text of a replicate job that reaches a pipeline as a prompt: the trigger (put in front
    of every render prompt, and the verify prompt's subject), the verify prompt, the render
    prompts (not negative prompts: they steer away)."""
    return ([("train.trigger", spec.train.trigger), ("verify.prompt", verify_prompt(spec))]
            + [(f"render[{i}].prompt", r.prompt) for i, r in enumerate(spec.render)])


def check_prompts(spec: KindSpec, denylist: tuple[str, ...], where: str = JOB_FILE) -> list[Problem]:
    """Refuse prompts holding a denylisted term (whole words, any case): every text its kind says
    reaches a pipeline as a prompt (engine.kinds.Kind.prompts)."""
    from engine.kinds import kind_named

    problems: list[Problem] = []
    for key, prompt in kind_named(spec.kind).prompts(spec):
        for term in denylist:
            if re.search(rf"(?<!\w){re.escape(term)}(?!\w)", prompt, flags=re.IGNORECASE):
                problems.append(Problem(f"{where}: {key}", f"contains the denied term {term!r} (config render.denylist)"))
    return problems


def resolve_photos(folder: Path, spec: KindSpec, extensions: tuple[str, ...], where: str = JOB_FILE) -> tuple[tuple[Path, ...], list[Problem]]:
    """The photo files of a job: listed in subject.photos, or every image in the folder but the
    files its kind's sections name (a mask is never taken for a photo).

    Every path must stay inside the folder after resolving symbolic links; the count must
    be 1 to the kind's `max_photos` (MAX_PHOTOS at most).
    """
    from engine.kinds import kind_named

    kind = kind_named(spec.kind)
    most, not_photos = kind.max_photos, set(kind.named_files(spec))
    problems: list[Problem] = []
    root = folder.resolve()
    photos: list[Path] = []
    if spec.subject.photos:
        for i, name in enumerate(spec.subject.photos):
            key = f"{where}: subject.photos[{i}]"
            candidate = folder / name
            if Path(name).is_absolute() or not _inside(candidate, root):
                problems.append(Problem(key, f"{name!r} points outside the job folder"))
                continue
            if not candidate.is_file():
                problems.append(Problem(key, f"{name!r} does not exist in the job folder" if not candidate.exists() else f"{name!r} is not a regular file"))
                continue
            if candidate.suffix.lower() not in extensions:
                problems.append(Problem(key, f"{name!r} is not one of the accepted image types ({', '.join(extensions)})"))
                continue
            photos.append(candidate)
        if len(set(p.name for p in photos)) != len(photos):
            problems.append(Problem(f"{where}: subject.photos", "the same photo is listed twice"))
    ignored: list[str] = []  # files that are not of an accepted type: named when no photo is found
    if not spec.subject.photos:
        for candidate in sorted(folder.iterdir()):
            if is_hidden_name(candidate.name) or candidate.suffix.lower() not in extensions:
                if not is_hidden_name(candidate.name) and candidate.name != JOB_FILE and candidate.is_file():
                    ignored.append(utf8_safe(candidate.name))
                continue
            if not _inside(candidate, root):
                continue  # reported by links_leaving(), as load_job calls it
            if utf8_safe(candidate.name) != candidate.name:
                problems.append(Problem(utf8_safe(candidate.name), "the file name is not UTF-8 text (an old encoding?); rename the file"))
                continue
            if candidate.is_file() and candidate.name not in not_photos:
                photos.append(candidate)
    if not problems:
        if not photos:
            skipped = (f"; not used, as their type is not accepted: {', '.join(ignored[:10])}" + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
                       + " (convert them, e.g. HEIC to JPEG or PNG)") if ignored else ""
            problems.append(Problem(f"{where}: subject.photos", f"no photo found: put {_photo_count(most)} ({', '.join(extensions)}) in the job folder{skipped}"))
        elif len(photos) > most:
            problems.append(Problem(f"{where}: subject.photos", f"{len(photos)} photos found; a {kind.name} job takes {_photo_count(most)} "
                                    "(list them in subject.photos)"))
    known = {p.relative_to(folder).as_posix() for p in photos}
    for name, _ in spec.subject.face_index:
        if name not in known:
            problems.append(Problem(f"{where}: subject.face_index.{key_text(name)}", "names no photo of this job"))
    return tuple(photos), problems


def _photo_count(most: int) -> str:
    return "one image" if most == 1 else f"1 to {most} images"


MAX_FOLDER_ENTRIES = 10_000  # files and folders in a job folder; a job is 1-3 photos and job.toml
MAX_FOLDER_DEPTH = 16  # levels of sub-folders in a job folder (notes, raw files...); deeper is refused as too_deep


def links_leaving(folder: Path) -> list[Problem]:
    """Every symbolic link under `folder` whose target is outside it (or cannot be resolved).

    Such a job is refused as a whole, used link or not: its inputs would not be what the lab
    dropped, the failed/ copy and the audit could not hold them, and a photo linked to another
    folder may change under a running job. Links that stay inside the folder are fine."""
    root = folder.resolve()
    problems: list[Problem] = []
    try:
        links = [entry for entry in walk_tree(folder, max_entries=MAX_FOLDER_ENTRIES) if entry.kind == "link"]
    except TreeLimit:
        return [Problem(utf8_safe(folder.name), f"holds more than {MAX_FOLDER_ENTRIES} files and folders; a job folder holds 1 to {MAX_PHOTOS} photos and {JOB_FILE}")]
    for entry in links:
        path = Path(entry.path)
        try:
            if path.resolve().is_relative_to(root):
                continue
            target = utf8_safe(os.readlink(path))
            problems.append(Problem(entry.rel, f"is a link to {target!r:.120}, outside the job folder; copy the file in instead"))
        except (OSError, RuntimeError):  # a loop of links
            problems.append(Problem(entry.rel, "is a link that cannot be followed (a loop of links?); copy the file in instead"))
    return problems


def is_hidden_name(name: str) -> bool:
    """Names that copy tools use while a transfer is in progress, and hidden files."""
    return name.startswith(".") or is_temporary_name(name)


def is_temporary_name(name: str) -> bool:
    """The names copy tools give a file or folder while it is being transferred."""
    return name.startswith("~") or name.endswith((".tmp", ".part", ".partial", ".crdownload"))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return False
    return True


@dataclass(frozen=True)
class LoadedJob:
    """A validated job: its spec with the subject name and photo list filled in."""

    folder: Path
    spec: Any  # its kind's spec (a KindSpec; JobSpec for replicate)
    photos: tuple[Path, ...]

    @property
    def subject(self) -> str:
        return self.spec.subject.name

    @property
    def kind(self) -> str:
        return self.spec.kind


def load_job(folder: Path, job_defaults: dict[str, Any], extensions: tuple[str, ...], denylist: tuple[str, ...],
             folder_name: str | None = None) -> LoadedJob:
    """Read and validate `folder/job.toml`. Raises one JobError listing every problem.

    `folder_name` is the name the folder was dropped under (the subject's default), when
    `folder` is the job's own copy of it (engine.jobfolder.INPUTS_DIR)."""
    folder = Path(folder)
    folder_name = folder.name if folder_name is None else folder_name
    if not folder.is_dir():
        raise JobError("invalid_job", f"{folder} is not a folder")
    link_problems = links_leaving(folder)
    if any(p.where == JOB_FILE for p in link_problems):  # never read a file from outside the job
        raise JobError("invalid_job", f"{JOB_FILE} is a link to a file outside the job folder; copy the file in instead", problems=tuple(link_problems))
    try:
        table = read_toml(folder / JOB_FILE, JOB_FILE)
    except JobError as error:
        if not link_problems:
            raise
        problems = link_problems + [Problem(JOB_FILE, error.message)]
        raise JobError(error.code, f"the job folder has {len(problems)} problems: " + "; ".join(map(str, problems[:3])), problems=tuple(problems)) from None
    spec, problems = parse_job_table(table, job_defaults, folder_name)
    problems = link_problems + problems
    if utf8_safe(folder_name) != folder_name:
        problems.append(Problem(utf8_safe(folder_name), "the folder name is not UTF-8 text (an old encoding?); rename the folder"))
    photos: tuple[Path, ...] = ()
    if spec is not None:
        from engine.kinds import kind_named

        problems += check_prompts(spec, denylist)
        photos, photo_problems = resolve_photos(folder, spec, extensions)
        problems += photo_problems
        if not photo_problems:
            problems += kind_named(spec.kind).folder_checks(spec, folder, tuple(p.relative_to(folder).as_posix() for p in photos), JOB_FILE)
    if problems or spec is None:
        raise JobError(
            "invalid_job",
            f"{JOB_FILE} has {len(problems)} problem{'s' * (len(problems) != 1)}: " + "; ".join(map(str, problems[:3])) + (" ..." if len(problems) > 3 else ""),
            problems=tuple(problems),
        )
    name = spec.subject.name or folder_name
    photo_names = tuple(p.relative_to(folder).as_posix() for p in photos)
    spec = dataclasses.replace(spec, subject=dataclasses.replace(spec.subject, name=name, photos=photo_names))
    return LoadedJob(folder=folder, spec=spec, photos=photos)


def safe_subject_name(folder_name: str) -> str:
    """A subject name for paths when the job itself could not be read (failed/<name>/...)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", folder_name).lstrip("._-")[:64]
    return cleaned or "unnamed"
