"""Kind `replicate` (the default): an identity replicated from 1-3 photos.

prepare -> embed -> train (a LoRA; nothing with [identity] method "faceid") -> verify (seed
discovery: the job's identity method against a control, and with [identity] compare the other
methods on the same seeds, locked by ArcFace drift) -> render (the job's prompts, in passes).

This module owns everything the kind knows: its sections ([train] and the shared ones from
engine.kinds.sections, [verify], [[render]], [identity]) with their defaults (config.toml's
[job.*] tables may override them), the checks between their keys, the prompts the denylist
screens, what it trains and the work each stage plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import Problem
from engine.kinds.registry import Kind
from engine.kinds.sections import (
    CONTROL_GROUP,
    DEFAULT_KIND,
    IDENTITY_METHODS,
    IdentityMethod,
    KindSpec,
    LoraRun,
    TrainSpec,
    train_checks,
)
from engine.schema import Bool, Either, Float, Int, ListOf, Str, Table, Tables, rule


@dataclass(frozen=True)
class VerifySpec:
    # A count of candidates (seeds base_seed, base_seed+1, ...) or an explicit list.
    seeds: int | tuple[int, ...] = field(
        default=16,
        metadata=rule(Either(Int(1, 256), ListOf(Int(0, 2**32 - 1), 1, 256), doc="a count 1-256 or a list of seeds")),
    )
    base_seed: int = field(default=0, metadata=rule(Int(0, 2**32 - 1)))
    threshold: float = field(default=0.18, metadata=rule(Float(0.0, 2.0)))
    # "{trigger}" stands for train.trigger (verify_prompt below), so a custom trigger is the one verified.
    prompt: str = field(default="a photo of {trigger}, portrait, neutral background", metadata=rule(Str(min_len=1, max_len=1000)))
    batch_size: int = field(default=4, metadata=rule(Int(1, 64)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))

    @property
    def seed_list(self) -> tuple[int, ...]:
        if isinstance(self.seeds, int):
            return tuple(self.base_seed + i for i in range(self.seeds))
        return self.seeds


@dataclass(frozen=True)
class RenderSpec:
    prompt: str = field(metadata=rule(Str(min_len=1, max_len=1000)))
    mode: str = field(default="three_pass", metadata=rule(Str(choices=("three_pass", "two_pass"))))
    count: int = field(default=1, metadata=rule(Int(1, 64)))
    negative_prompt: str = field(default="", metadata=rule(Str(max_len=1000)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))


@dataclass(frozen=True)
class IdentitySpec(IdentityMethod):
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
class JobSpec(KindSpec):
    """A `replicate` job (this module): trained, verified, rendered."""

    render: tuple[RenderSpec, ...] = field(metadata=rule(Tables(RenderSpec, 1, 16)))
    train: TrainSpec = field(default_factory=TrainSpec, metadata=rule(Table(TrainSpec)))
    verify: VerifySpec = field(default_factory=VerifySpec, metadata=rule(Table(VerifySpec)))
    identity: IdentitySpec = field(default_factory=IdentitySpec, metadata=rule(Table(IdentitySpec)))


def replicate_lora_runs(spec: JobSpec) -> tuple[LoraRun, ...]:
    """The job's LoRA, unless it renders with FaceID alone and compares nothing (nothing to train)."""
    return (LoraRun(),) if spec.identity.trains else ()


def replicate_checks(spec: JobSpec, where: str) -> list[Problem]:
    """A replicate job's checks between keys: its training's, and distinct verify seeds."""
    problems = train_checks(spec.train, where)
    seeds = spec.verify.seed_list
    if len(set(seeds)) != len(seeds):
        problems.append(Problem(f"{where}: verify.seeds", "seeds must be distinct"))
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


def planned_work(spec: JobSpec, stage: str) -> int | None:
    """Training steps (the cap: phases may converge sooner), seed renders (every verify group at
    every seed) and render passes (three or two per image)."""
    if stage == "train":
        return spec.train.max_steps * len(replicate_lora_runs(spec))
    if stage == "verify":
        return len(spec.identity.verify_groups) * len(spec.verify.seed_list)
    if stage == "render":
        return sum(entry.count * (3 if entry.mode == "three_pass" else 2) for entry in spec.render)
    return None


REPLICATE = Kind(
    name=DEFAULT_KIND,  # the kind of a job.toml that names none
    stages=("prepare", "embed", "train", "verify", "render"),
    spec=JobSpec,
    report=("summary", "timeline", "seeds", "drift", "renders", "second_model", "training", "settings", "audit"),
    prompts=replicate_prompts,
    checks=replicate_checks,
    lora_runs=replicate_lora_runs,
    planned_work=planned_work,
    progress=(("train", "step"), ("verify", "image"), ("render", "image")),
    config_defaults=("prepare", "train", "verify", "identity", "render"),
    title="Identity replication report",
    summary="an identity from 1-3 photos: prepare, embed, LoRA training, seed discovery, stylised renders",
)
