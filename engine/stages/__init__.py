"""The stages, in order. Each is one module with NAME, VERSION, OUTPUTS (paths it owns in
the job folder), `fingerprint(ctx)` (everything its result depends on, besides the previous
stage) and `run(ctx)`. VERSION changes when a stage's code changes its results. SCRATCH
(optional) lists working files, such as training checkpoints, kept only so that an
interrupted run of the same stage can resume; they are removed once the stage completes.

STAGE_NAMES is plain data, so that readers of job folders (`status`, the daemon's metrics)
need not import the stages, which pull in torch and diffusers; STAGES imports them on first use."""

from __future__ import annotations

from types import ModuleType

STAGE_NAMES = ("prepare", "embed", "train", "verify", "render")


def __getattr__(name: str) -> tuple[ModuleType, ...]:
    if name == "STAGES":
        from engine.stages import embed, prepare, render, train, verify

        stages = (prepare, embed, train, verify, render)
        if tuple(stage.NAME for stage in stages) != STAGE_NAMES:
            raise RuntimeError(f"STAGE_NAMES {STAGE_NAMES} disagrees with the stage modules")
        globals()["STAGES"] = stages
        return stages
    raise AttributeError(f"module 'engine.stages' has no attribute {name!r}")
