"""Job kinds: which pipeline a job asks for (job.toml's top-level `kind`; "replicate" when absent).

A kind is data (`Kind`): its name, its stages in order (names from engine.stages), the frozen
dataclass its job.toml is read into (`kind`, `subject`, `prepare` and the kind's own sections),
the report's sections, and its own checks (the prompts the denylist screens, cross-checks between
keys). The runner, ledger, resume, audit log, outbox, failed/, report and status work the same for
every kind, from this data alone: a new kind is one module in this package defining its `Kind`
(listed in `_built_in` below), plus the stages of its own in engine/stages; `register_kind` adds
one from outside (a test's throw-away kind, a lab's plug-in named in config.toml: engine.plugins),
which may bring stages of its own (`Kind.stage_modules`).

This module owns the registry of kinds and what a job folder's kind is. Plain data: importing it
pulls in no stage (readers of job folders, `status` and the daemon's metrics, use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import Problem

DEFAULT_KIND = "replicate"
# The sections every kind's spec has: who the subject is, and how the photos are prepared.
COMMON_SECTIONS = ("subject", "prepare")


def _no_prompts(spec: Any) -> list[tuple[str, str]]:
    return []


def _no_checks(spec: Any, where: str) -> list[Problem]:
    return []


def _no_files(spec: Any) -> tuple[str, ...]:
    return ()


def _no_folder_checks(spec: Any, folder: Any, photos: tuple[str, ...], where: str) -> list[Problem]:
    return []


def _main_lora_only(spec: Any) -> tuple[Any, ...]:
    from engine.job import LoraRun

    return (LoraRun(),)


@dataclass(frozen=True)
class Kind:
    """One pipeline. `spec`: a frozen dataclass with fields `kind`, `subject`, `prepare` and the
    kind's own sections (engine.schema rules in their metadata, as engine.job's); `stages`: stage
    names (engine.stages.stage_module); `report`: the report's sections, in order (names of
    engine.report.SECTIONS), with the charts they show; `prompts(spec)`: (key, text) of every text
    that reaches a pipeline as a prompt, for the denylist; `checks(spec, where)`: problems between
    keys that no single key's rule can see; `folder_checks(spec, folder, photos, where)`: problems
    between the job.toml and its folder (the files it names), once its photos are known;
    `lora_runs(spec)`: what the train stage trains (engine.job.LoraRun), for a kind that trains;
    `stage_modules`: stage name -> module path of the stages a kind from outside engine/ brings
    (each with the contract of engine.stages), added to the stages when the kind is registered."""

    name: str
    stages: tuple[str, ...]
    spec: type
    report: tuple[str, ...] = ("timeline", "settings", "audit")
    prompts: Callable[[Any], list[tuple[str, str]]] = _no_prompts
    checks: Callable[[Any, str], list[Problem]] = _no_checks
    max_photos: int = 3  # a job of this kind takes 1 to max_photos photos (engine.job.MAX_PHOTOS at most)
    named_files: Callable[[Any], tuple[str, ...]] = _no_files  # files its sections name (masks): never taken for photos
    folder_checks: Callable[[Any, Any, tuple[str, ...], str], list[Problem]] = _no_folder_checks
    lora_runs: Callable[[Any], tuple[Any, ...]] = _main_lora_only
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
        from engine.stages import STAGE_MODULES, is_stage

        unknown = [name for name in self.stages if not is_stage(name) and name not in self.stage_modules]
        if unknown:
            raise ValueError(f"kind {self.name!r}: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_MODULES)}")
        built_in = [name for name in self.stage_modules if name in STAGE_MODULES]
        if built_in:
            raise ValueError(f"kind {self.name!r} brings stage(s) {', '.join(built_in)}, but engine/stages has stage(s) of that name")

    @property
    def sections(self) -> tuple[str, ...]:
        """The top-level job.toml keys of this kind (besides `kind`)."""
        return tuple(f.name for f in dataclasses.fields(self.spec) if f.name != "kind")

    def stages_through(self, until: str | None) -> tuple[str, ...]:
        """The stages up to and including `until` (all of them for None)."""
        return self.stages if until is None else self.stages[: self.stages.index(until) + 1]


def _built_in() -> dict[str, Kind]:
    from engine.kinds.evaluate import EVALUATE
    from engine.kinds.replicate import REPLICATE
    from engine.kinds.restore import RESTORE
    from engine.kinds.retouch import RETOUCH

    return {kind.name: kind for kind in (REPLICATE, RETOUCH, RESTORE, EVALUATE)}


def register_kind(kind: Kind) -> Kind:
    """Add a kind to the built-in ones (a test's kind of its own, a lab's plug-in), with the
    stages it brings. A name already taken by another kind, or a stage name by another stage,
    is refused (and nothing is added): a job's kind must mean one pipeline, a stage one module."""
    from engine.stages import register_stage

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
    from engine.stages import unregister_stage

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


# The built-in kinds (a new kind's module adds its Kind to `_built_in`); plain data, no import side effect.
_KINDS: dict[str, Kind] = _built_in()
