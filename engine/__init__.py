"""The identity pipeline as a library: job kinds (engine.kinds), each an ordered list of stages;
the default kind, replicate, is prepare -> embed -> train -> verify -> render.

Knows nothing of watched folders (that is `daemon/`). The public names are few on purpose;
`engine.jobfolder` is the job-folder vocabulary (where a job is on disk, publishing a failure)
that the daemon shares with the engine.
They are imported on first use (PEP 562), so that `import engine.fsutil` does not pull in
torch and diffusers (seconds) for a process that only needs a helper.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "run_job": "engine.runner",
    "Engine": "engine.runner",
    "JobResult": "engine.runner",
    "JobSpec": "engine.kinds.replicate",
    "KindSpec": "engine.kinds.sections",
    "Kind": "engine.kinds",
    "register_kind": "engine.kinds",
    "known_kinds": "engine.kinds",
    "Settings": "engine.config",
    "verify_audit": "engine.provenance.verification",
    "embed_faces": "engine.identity.faces",
    "drift": "engine.identity.faces",
    "JobError": "engine.errors",
    "ConfigError": "engine.errors",
    "JobInterrupted": "engine.errors",
    "OwnershipLost": "engine.errors",
    "JobOutcome": "engine.lifecycle",  # a run's outcome; StrEnum, equal to the plain strings
    "find_config": "engine.cli",  # the CLIs' shared set-up
    "read_settings": "engine.cli",
    "configure_json_logging": "engine.cli",
    "global_options": "engine.cli",
    "run_command": "engine.cli",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
