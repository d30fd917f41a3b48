"""The stages, in order. Each is one module with NAME, VERSION, OUTPUTS (paths it owns in
the job folder), `fingerprint(ctx)` (everything its result depends on, besides the previous
stage) and `run(ctx)`. VERSION changes when a stage's code changes its results."""

from engine.stages import embed, prepare

STAGES = (prepare, embed)
STAGE_NAMES = tuple(stage.NAME for stage in STAGES)
