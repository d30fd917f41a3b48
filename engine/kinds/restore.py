"""Kind `restore`: a damaged portrait inpainted where its mask says, refused (or flagged) when the
mask hides too much of the face, and scored by identity, never by pixel error.

One stage, restore (engine/stages/restore.py). It finds the face itself, on a classically
pre-filled copy: prepare's detector would fail on the damage, and the references, not the damaged
photo, are the identity. Its job.toml section is engine.job's `RestoreSpec` ([restore]).
"""

from __future__ import annotations

from engine.job import RestoreJobSpec, restore_checks, restore_prompts
from engine.kinds import Kind


def _named_files(spec: RestoreJobSpec) -> tuple[str, ...]:
    return tuple(name for name in (spec.restore.mask, spec.restore.painted, *spec.restore.references) if name)


RESTORE = Kind(
    name="restore",
    stages=("restore",),
    spec=RestoreJobSpec,
    report=("restore_summary", "restore_variants", "settings", "audit"),
    prompts=restore_prompts,
    checks=restore_checks,
    max_photos=1,
    named_files=_named_files,
    title="Restoration report",
    summary="one damaged portrait: inpainted inside its mask, refused when the mask hides too much of the face, scored by identity",
)
