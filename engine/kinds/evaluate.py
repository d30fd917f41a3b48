"""Kind `evaluate`: prompt x seed x training group against a control, measured like an experiment.

prepare -> embed -> train (the job's LoRA as a replicate job trains it, with the phase snapshots
its groups name, and one LoRA per photo-subset group) -> mine (anchored face mining from the
job's LoRA, with [mine] enabled = true; else nothing) -> evaluate (every cell rendered at fixed
seeds, scored by ArcFace drift and the second model, faces not found counted; engine.evalstats).
Its job.toml sections are [train] (as replicate's), [evaluate] with [[evaluate.group]], and [mine].
"""

from __future__ import annotations

from engine.job import EvaluateJobSpec, evaluate_checks, evaluate_denied, evaluate_folder_checks, evaluate_lora_runs
from engine.kinds import Kind


def _lora_files(spec: EvaluateJobSpec) -> tuple[str, ...]:
    return tuple(group.file for group in spec.evaluate.group if group.file)


EVALUATE = Kind(
    name="evaluate",
    stages=("prepare", "embed", "train", "mine", "evaluate"),
    spec=EvaluateJobSpec,
    report=("evaluate_summary", "timeline", "evaluate_charts", "evaluate_sheets", "evaluate_table", "mine", "training", "settings", "audit"),
    prompts=evaluate_denied,
    checks=evaluate_checks,
    folder_checks=evaluate_folder_checks,
    named_files=_lora_files,
    lora_runs=evaluate_lora_runs,
    title="Evaluation report",
    summary="prompts x fixed seeds x training groups (photo subsets, phase snapshots, brought LoRAs) against a control, scored and tested",
)
