"""Kind `replicate` (the default): an identity replicated from 1-3 photos.

prepare -> embed -> train (a LoRA; nothing with [identity] method "faceid") -> verify (seed
discovery: the job's identity method against a control, and with [identity] compare the other
methods on the same seeds, locked by ArcFace drift) -> render (the job's prompts, in passes). Its job.toml sections and their checks
are engine.job's (`JobSpec`), as config.toml gives defaults for them.
"""

from __future__ import annotations

from engine.job import JobSpec, replicate_checks, replicate_lora_runs, replicate_prompts
from engine.kinds import Kind

REPLICATE = Kind(
    name="replicate",
    stages=("prepare", "embed", "train", "verify", "render"),
    spec=JobSpec,
    report=("summary", "timeline", "seeds", "drift", "renders", "second_model", "training", "settings", "audit"),
    prompts=replicate_prompts,
    checks=replicate_checks,
    lora_runs=replicate_lora_runs,
    title="Identity replication report",
    summary="an identity from 1-3 photos: prepare, embed, LoRA training, seed discovery, stylised renders",
)
