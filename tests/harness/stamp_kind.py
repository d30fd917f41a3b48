"""Kind `stamp`, defined only here, to prove that adding a kind is one file plus the stages it adds
(issue 32): loaded as a lab's plug-in (config.toml `[kinds] plugins = ["tests.harness.stamp_kind"]`,
engine.plugins), it runs through the daemon, the runner, the ledger, the audit log, the report
and status with no line of engine/ naming it.

prepare (the built-in stage) -> stamp (this module: the stage contract of engine.stages, NAME to
run) writes stamp/stamp.json: the job's [stamp] text and the prepared images it found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import layout
from engine.context import StageContext
from engine.fsutil import atomic_write_json
from engine.kinds.sections import KindSpec
from engine.kinds import Kind
from engine.schema import Str, Table, rule, to_plain

# ---------------------------------------------------------------------------- the kind


@dataclass(frozen=True)
class StampSpec:
    text: str = field(default="stamped", metadata=rule(Str(min_len=1, max_len=200)))


@dataclass(frozen=True, kw_only=True)
class StampJobSpec(KindSpec):
    """A `stamp` job: the sections every kind has, and [stamp]."""

    kind: str = field(default="stamp", metadata=rule(Str(min_len=1, max_len=64)))
    stamp: StampSpec = field(default_factory=StampSpec, metadata=rule(Table(StampSpec)))


STAMP = Kind(name="stamp", stages=("prepare", "stamp"), spec=StampJobSpec, report=("timeline", "settings", "audit"),
             stage_modules={"stamp": __name__}, title="Stamp report", summary="a test's plug-in kind: prepared photos, stamped")

KINDS = (STAMP,)  # what engine.plugins registers

# ---------------------------------------------------------------------------- its stage

NAME = "stamp"
VERSION = 1
STAMP_DIR = "stamp"
STAMP_FILE = f"{STAMP_DIR}/stamp.json"
OUTPUTS = (STAMP_DIR,)
MODELS: tuple[str, ...] = ()  # the model roles it may use: none


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {"stamp": to_plain(ctx.job.spec.stamp)}


def run(ctx: StageContext) -> None:
    prepared = sorted(image.file for image in layout.prepared_images(ctx.job_dir))
    atomic_write_json(ctx.path(STAMP_FILE), {"text": ctx.job.spec.stamp.text, "subject": ctx.job.spec.subject.name, "prepared": prepared})
    ctx.log.info("stamped", images=len(prepared))
