"""Kind `retouch`: one portrait, region-masked inpainting sweeps where "identity unchanged" is
measured, not claimed.

prepare -> embed (the face found and its reference embedding, as for every kind) -> retouch:
landmark masks (engine.regions), strengths x seeds per region set, each variant pasted into the
original at its native resolution and measured (engine.measures). Its job.toml section is
engine.job's `RetouchSpec` ([retouch]).
"""

from __future__ import annotations

from engine.job import RetouchJobSpec, retouch_checks, retouch_prompts
from engine.kinds import Kind


def _mask_files(spec: RetouchJobSpec) -> tuple[str, ...]:
    return tuple(file for _, file in spec.retouch.masks)


RETOUCH = Kind(
    name="retouch",
    stages=("prepare", "embed", "retouch"),
    spec=RetouchJobSpec,
    report=("retouch_summary", "timeline", "retouch_masks", "retouch_grids", "retouch_variants", "settings", "audit"),
    prompts=retouch_prompts,
    checks=retouch_checks,
    max_photos=1,
    named_files=_mask_files,
    title="Retouch report",
    summary="one portrait: region-masked inpainting sweeps (strength x seed), each variant measured for identity, texture and colour",
)
