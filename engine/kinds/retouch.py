"""Kind `retouch`: one portrait, region-masked inpainting sweeps where "identity unchanged" is
measured, not claimed.

prepare -> embed (the face found and its reference embedding, as for every kind) -> retouch:
landmark masks (engine.identity.regions), strengths x seeds per region set, each variant pasted into the
original at its native resolution and measured (engine.measure.texture). This module owns its section
([retouch], `RetouchSpec`: the region names are engine.identity.regions', the acceptance limits
engine.measure.texture.AcceptLimits), its checks and the work its sweep plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import Problem
from engine.kinds.registry import Kind
from engine.kinds.sections import KindSpec
from engine.measure.texture import AcceptLimits
from engine.identity.regions import REGIONS
from engine.schema import Bool, Float, Int, ListOf, MapOf, Str, Table, key_text, rule


@dataclass(frozen=True)
class RetouchCaps:
    """The highest inpainting strength each region takes: a strength above it is refused, never clamped."""

    forehead: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))
    under_eye: float = field(default=0.28, metadata=rule(Float(0.0, 1.0, low_open=True)))
    smile_lines: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))
    chin: float = field(default=0.32, metadata=rule(Float(0.0, 1.0, low_open=True)))


if tuple(f.name for f in dataclasses.fields(RetouchCaps)) != REGIONS:  # a cap per region of engine.identity.regions, in its order
    raise TypeError(f"RetouchCaps names {[f.name for f in dataclasses.fields(RetouchCaps)]}, not engine.identity.regions.REGIONS {list(REGIONS)}")


@dataclass(frozen=True)
class RetouchSpec:
    """A retouch sweep: every region set (each region alone, and all of them together with
    `combine`) x `strengths` x `seeds`, inpainted, pasted into the original photo and measured."""

    regions: tuple[str, ...] = field(default=REGIONS, metadata=rule(ListOf(Str(choices=REGIONS), 1, len(REGIONS))))
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
    accept: AcceptLimits = field(default_factory=AcceptLimits, metadata=rule(Table(AcceptLimits)))

    def denoising_steps(self, strength: float) -> int:
        """The steps an inpainting call at `strength` really denoises (diffusers: int(steps x strength))."""
        return int(self.steps * strength)


@dataclass(frozen=True, kw_only=True)
class RetouchJobSpec(KindSpec):
    """A `retouch` job (this module): one photo, region-masked inpainting sweeps."""

    kind: str = field(default="retouch", metadata=rule(Str(min_len=1, max_len=64)))
    retouch: RetouchSpec = field(default_factory=RetouchSpec, metadata=rule(Table(RetouchSpec)))


def retouch_checks(spec: RetouchJobSpec, where: str) -> list[Problem]:
    """Strengths above a region's cap, strengths that denoise the same number of steps (identical
    images under two names) or none, mask overrides for regions not swept, repeated seeds."""
    problems: list[Problem] = []
    r = spec.retouch
    caps = {name: getattr(r.caps, name) for name in REGIONS}
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


def planned_work(spec: RetouchJobSpec, stage: str) -> int | None:
    """Variants at most (a region found not applicable is not swept): every region alone, and
    all of them together with `combine`, x strengths x seeds."""
    if stage != "retouch":
        return None
    r = spec.retouch
    sets = len(r.regions) + (1 if r.combine and len(r.regions) > 1 else 0)
    return sets * len(r.strengths) * len(r.seeds)


def _mask_files(spec: RetouchJobSpec) -> tuple[str, ...]:
    return tuple(file for _, file in spec.retouch.masks)


RETOUCH = Kind(
    name="retouch",
    stages=("prepare", "embed", "retouch"),
    spec=RetouchJobSpec,
    report=("retouch_summary", "timeline", "retouch_masks", "retouch_closeups", "retouch_grids", "retouch_variants", "settings", "audit"),
    prompts=retouch_prompts,
    checks=retouch_checks,
    max_photos=1,
    named_files=_mask_files,
    planned_work=planned_work,
    progress=(("retouch", "variant"),),
    title="Retouch report",
    summary="one portrait: region-masked inpainting sweeps (strength x seed), each variant measured for identity, texture and colour",
)
