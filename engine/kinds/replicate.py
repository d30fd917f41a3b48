"""Kind `replicate` (the default): an identity replicated from 1-3 photos.

prepare -> embed -> train (a LoRA) -> verify (seed discovery: LoRA against a control, locked by
ArcFace drift) -> render (the job's prompts, in passes). Its job.toml sections and their checks
are engine.job's (`JobSpec`), as config.toml gives defaults for them.
"""

from __future__ import annotations

from engine.job import JobSpec, replicate_checks, replicate_prompts
from engine.kinds import Kind

REPLICATE = Kind(
    name="replicate",
    stages=("prepare", "embed", "train", "verify", "render"),
    spec=JobSpec,
    report=("summary", "timeline", "seeds", "drift", "renders", "second_model", "training", "settings", "audit"),
    prompts=replicate_prompts,
    checks=replicate_checks,
    title="Identity replication report",
    summary="an identity from 1-3 photos: prepare, embed, LoRA training, seed discovery, stylised renders",
)
