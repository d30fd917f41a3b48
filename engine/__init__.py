"""The identity pipeline as a library: prepare -> embed -> train -> verify -> render.

Knows nothing of watched folders (that is `daemon/`). The public names are few on purpose.
"""

from engine.audit import verify_audit
from engine.config import Settings
from engine.errors import ConfigError, JobError
from engine.faces import drift, embed_faces
from engine.job import JobSpec
from engine.runner import Engine, JobResult, run_job

__all__ = ["run_job", "Engine", "JobResult", "JobSpec", "Settings", "verify_audit", "embed_faces", "drift", "JobError", "ConfigError"]
