"""The stages. Each is one module with NAME, VERSION, OUTPUTS (paths it owns in the job folder,
names from engine.layout), MODELS (every model role it may use, whatever the job: the one
declaration engine.inventory reads to check the installation), `models(ctx)` (the roles of MODELS
this job uses: engine.resources hashes them, and the runner puts them both in the stage's
fingerprint and in `models_used`),
`fingerprint(ctx)` (everything else its result depends on, besides the previous stage) and
`run(ctx)`. VERSION changes when a stage's code changes its results. SCRATCH (optional) lists
working files, such as training checkpoints, kept only so that an interrupted run of the same
stage can resume; they are removed once the stage completes.

Which stages a job runs, in which order, is its kind's (engine.kinds). A stage reads what an
earlier one wrote through engine.layout, never by importing that stage.

STAGE_MODULES is plain data, so that readers of job folders (`status`, the daemon's metrics)
need not import the stages, which pull in torch and diffusers; `stage_module` imports one on use.
A kind from outside engine/ (a lab's plug-in, engine.plugins) brings stages of its own
(engine.kinds.Kind.stage_modules); registering the kind adds them here (`register_stage`)."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

STAGE_MODULES = {
    "prepare": "engine.stages.prepare",
    "embed": "engine.stages.embed",
    "train": "engine.stages.train",
    "verify": "engine.stages.verify",
    "render": "engine.stages.render",
    "retouch": "engine.stages.retouch",
    "restore": "engine.stages.restore",
    "mine": "engine.stages.mine",
    "evaluate": "engine.stages.evaluate",
}


# Stages that kinds from outside engine/ brought: name -> module path (register_stage).
_ADDED: dict[str, str] = {}


def register_stage(name: str, module: str) -> None:
    """Add a stage from outside engine/ (engine.kinds.register_kind calls it for a kind's
    `stage_modules`). A name that is a built-in stage, or another module's, is refused: a job's
    ledger names stages, and one name must mean one stage."""
    taken = STAGE_MODULES.get(name) or _ADDED.get(name)
    if taken is not None and taken != module:
        raise ValueError(f"a stage named {name!r} already exists ({taken})")
    _ADDED[name] = module


def unregister_stage(name: str) -> None:
    """Remove a stage added by register_stage (a test's kind that is removed again)."""
    _ADDED.pop(name, None)


def is_stage(name: str) -> bool:
    return name in STAGE_MODULES or name in _ADDED


def declared_models(name: str) -> tuple[str, ...]:
    """Stage `name`'s MODELS, read from its module's source without importing it: the stage
    modules pull in torch (seconds), and `engine models check` and every start-up (engine.inventory)
    need only this one line. MODELS must therefore be a literal tuple of strings; the runner
    checks each job's `models(ctx)` against the imported module's own MODELS."""
    return _literal_models(STAGE_MODULES.get(name) or _ADDED[name])


@functools.cache
def _literal_models(module_path: str) -> tuple[str, ...]:
    spec = importlib.util.find_spec(module_path)
    if spec is None or spec.origin is None:
        raise ValueError(f"stage module {module_path} not found")
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "MODELS":
            try:
                roles = ast.literal_eval(value) if value is not None else None
            except ValueError:
                roles = None
            if isinstance(roles, tuple) and all(isinstance(role, str) for role in roles):
                return roles
    raise ValueError(f"stage module {module_path} has no MODELS = (a literal tuple of model role names)")


def stage_module(name: str) -> ModuleType:
    """The module of stage `name` (imported on first use)."""
    module = importlib.import_module(STAGE_MODULES.get(name) or _ADDED[name])
    if module.NAME != name:
        raise RuntimeError(f"stage module {module.__name__} calls itself {module.NAME!r}, not {name!r}")
    return module
