"""Kind `restore`: a damaged portrait inpainted where its mask says, refused (or flagged) when the
mask hides too much of the face, and scored by identity, never by pixel error.

One stage, restore (engine/stages/restore.py). It finds the face itself, on a classically
pre-filled copy: prepare's detector would fail on the damage, and the references, not the damaged
photo, are the identity. This module owns its section ([restore], `RestoreSpec`) and its checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import Problem
from engine.kinds.registry import Kind
from engine.kinds.sections import KindSpec
from engine.schema import Float, Int, ListOf, Str, Table, rule


@dataclass(frozen=True)
class RestoreSpec:
    """A restoration: the damage mask's file, optional undamaged references of the same person,
    K seeds, and where it stops (engine.identity.coverage's limits: shares 0-1, crossed when above)."""

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
    """A `restore` job (this module): one damaged photo, its mask, optional references."""

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


def _named_files(spec: RestoreJobSpec) -> tuple[str, ...]:
    return tuple(name for name in (spec.restore.mask, spec.restore.painted, *spec.restore.references) if name)


RESTORE = Kind(
    name="restore",
    stages=("restore",),
    spec=RestoreJobSpec,
    report=("restore_summary", "restore_closeups", "restore_variants", "settings", "audit"),
    prompts=restore_prompts,
    checks=restore_checks,
    max_photos=1,
    named_files=_named_files,
    title="Restoration report",
    summary="one damaged portrait: inpainted inside its mask, refused when the mask hides too much of the face, scored by identity",
)
