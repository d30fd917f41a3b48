"""The registry of job kinds: `Kind` (what one pipeline is, as data) and the look-ups by name.

Imports no kind: the built-in kinds are registered by the package (engine/kinds/__init__.py), a
test's or a lab's own kind by `register_kind`, so that a kind's module can import this one and
engine.job can import the package without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import Problem
from engine.kinds.sections import COMMON_SECTIONS, DEFAULT_KIND, MAX_PHOTOS, LoraRun
from engine.stages import STAGE_MODULES, is_stage, register_stage, unregister_stage


def _no_prompts(spec: Any) -> list[tuple[str, str]]:
    return []


def _no_checks(spec: Any, where: str) -> list[Problem]:
    return []


def _no_files(spec: Any) -> tuple[str, ...]:
    return ()


def _no_folder_checks(spec: Any, folder: Any, photos: tuple[str, ...], where: str) -> list[Problem]:
    return []


def _main_lora_only(spec: Any) -> tuple[LoraRun, ...]:
    return (LoraRun(),)


def _nothing_planned(spec: Any, stage: str) -> int | None:
    return None


@dataclass(frozen=True)
class Kind:
    """One pipeline. `spec`: a frozen dataclass with fields `kind`, `subject`, `prepare` and the
    kind's own sections (engine.schema rules in their metadata, as engine.kinds.sections'); `stages`: stage
    names (engine.stages.stage_module); `report`: the report's sections, in order (names of
    engine.report.SECTIONS), with the charts they show; `prompts(spec)`: (key, text) of every text
    that reaches a pipeline as a prompt, for the denylist; `checks(spec, where)`: problems between
    keys that no single key's rule can see; `folder_checks(spec, folder, photos, where)`: problems
    between the job.toml and its folder (the files it names), once its photos are known;
    `lora_runs(spec)`: what the train stage trains (engine.kinds.sections.LoraRun), for a kind that trains;
    `planned_work(spec, stage)`: the units of work a stage of this kind plans (training steps,
    images, variants; None: not counted), for status and progress, with `progress` naming each
    counted stage's unit; `config_defaults`: the sections config.toml's [job.<section>] tables may
    give defaults for (an array of tables, like [[render]]: defaults for each entry);
    `stage_modules`: stage name -> module path of the stages a kind from outside engine/ brings
    (each with the contract of engine.stages), added to the stages when the kind is registered."""

    name: str
    stages: tuple[str, ...]
    spec: type
    report: tuple[str, ...] = ("timeline", "settings", "audit")
    prompts: Callable[[Any], list[tuple[str, str]]] = _no_prompts
    checks: Callable[[Any, str], list[Problem]] = _no_checks
    max_photos: int = MAX_PHOTOS  # a job of this kind takes 1 to max_photos photos (MAX_PHOTOS at most)
    named_files: Callable[[Any], tuple[str, ...]] = _no_files  # files its sections name (masks): never taken for photos
    folder_checks: Callable[[Any, Any, tuple[str, ...], str], list[Problem]] = _no_folder_checks
    lora_runs: Callable[[Any], tuple[LoraRun, ...]] = _main_lora_only
    planned_work: Callable[[Any, str], int | None] = _nothing_planned
    progress: tuple[tuple[str, str], ...] = ()  # (stage, unit of its planned work), e.g. ("train", "step")
    config_defaults: tuple[str, ...] = ("prepare",)
    summary: str = ""  # one line for `--help` and the README
    title: str = ""  # the report's heading ("<name> report" when empty)
    stage_modules: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.spec)}
        missing = {"kind", *COMMON_SECTIONS} - names
        if missing:
            raise TypeError(f"kind {self.name!r}: its spec {self.spec.__name__} lacks {', '.join(sorted(missing))}")
        if not self.stages:
            raise TypeError(f"kind {self.name!r} has no stages")
        if len(set(self.stages)) != len(self.stages):
            raise TypeError(f"kind {self.name!r} lists a stage twice")
        unknown = [name for name in self.stages if not is_stage(name) and name not in self.stage_modules]
        if unknown:
            raise ValueError(f"kind {self.name!r}: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_MODULES)}")
        built_in = [name for name in self.stage_modules if name in STAGE_MODULES]
        if built_in:
            raise ValueError(f"kind {self.name!r} brings stage(s) {', '.join(built_in)}, but engine/stages has stage(s) of that name")
        for stage, _ in self.progress:
            if stage not in self.stages:
                raise ValueError(f"kind {self.name!r}: progress names {stage!r}, not one of its stages")
        for section in self.config_defaults:
            if section not in names:
                raise ValueError(f"kind {self.name!r}: config_defaults names {section!r}, not a section of its spec")

    @property
    def sections(self) -> tuple[str, ...]:
        """The top-level job.toml keys of this kind (besides `kind`)."""
        return tuple(f.name for f in dataclasses.fields(self.spec) if f.name != "kind")

    def stages_through(self, until: str | None) -> tuple[str, ...]:
        """The stages up to and including `until` (all of them for None)."""
        return self.stages if until is None else self.stages[: self.stages.index(until) + 1]


_KINDS: dict[str, Kind] = {}  # filled by engine/kinds/__init__.py (the built-in kinds) and register_kind


def register_kind(kind: Kind) -> Kind:
    """Add a kind to the built-in ones (a test's kind of its own, a lab's plug-in), with the
    stages it brings. A name already taken by another kind, or a stage name by another stage,
    is refused (and nothing is added): a job's kind must mean one pipeline, a stage one module."""
    if _KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"a kind named {kind.name!r} is already registered")
    taken = {name: module for other in _KINDS.values() if other.name != kind.name for name, module in other.stage_modules.items()}
    for name, module in kind.stage_modules.items():
        if taken.get(name, module) != module:
            raise ValueError(f"kind {kind.name!r}: a stage named {name!r} already exists ({taken[name]})")
    for name, module in kind.stage_modules.items():
        register_stage(name, module)
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind, and the stages it brought that no other kind uses (tests that registered one of their own)."""
    if name == DEFAULT_KIND:
        raise ValueError(f"the default kind {DEFAULT_KIND!r} cannot be removed")
    kind = _KINDS.pop(name, None)
    still_used = {stage for other in _KINDS.values() for stage in other.stage_modules}
    for stage in kind.stage_modules if kind is not None else ():
        if stage not in still_used:
            unregister_stage(stage)


def known_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def kind_named(name: str) -> Kind:
    """The kind called `name`; KeyError (with the known kinds) for any other."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a job kind; known kinds: {', '.join(known_kinds())}") from None


def all_kinds() -> tuple[Kind, ...]:
    return tuple(_KINDS[name] for name in known_kinds())


def sections_of_other_kinds(kind: Kind) -> dict[str, tuple[str, ...]]:
    """Section -> the kinds it belongs to, for the sections `kind` does not have."""
    owners: dict[str, list[str]] = {}
    for other in all_kinds():
        for section in other.sections:
            if section not in kind.sections:
                owners.setdefault(section, []).append(other.name)
    return {section: tuple(names) for section, names in owners.items()}


def all_stage_names() -> tuple[str, ...]:
    """Every stage some kind runs, in the order the kinds first list them (for `--until`)."""
    names: list[str] = []
    for kind in [_KINDS[DEFAULT_KIND], *all_kinds()]:
        names += [name for name in kind.stages if name not in names]
    return tuple(names)


def progress_units() -> dict[str, str]:
    """Stage -> the unit of its planned work, for every stage some kind counts (engine.status's
    long stages), in all_stage_names' order."""
    units: dict[str, str] = {}
    for kind in all_kinds():
        for stage, unit in kind.progress:
            units.setdefault(stage, unit)
    return {stage: units[stage] for stage in all_stage_names() if stage in units}
