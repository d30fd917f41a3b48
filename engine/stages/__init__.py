"""The stages, in order. Each is one module with NAME, VERSION, OUTPUTS (paths it owns in
the job folder), `fingerprint(ctx)` (everything its result depends on, besides the previous
stage) and `run(ctx)`. VERSION changes when a stage's code changes its results. SCRATCH
(optional) lists working files, such as training checkpoints, kept only so that an
interrupted run of the same stage can resume; they are removed once the stage completes."""

from engine.stages import embed, prepare, render, train, verify

STAGES = (prepare, embed, train, verify, render)
STAGE_NAMES = tuple(stage.NAME for stage in STAGES)
