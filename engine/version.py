"""The engine's own version: the package version, and the git commit it was built from when
that is known (the IDREP_GIT_COMMIT the image was built with, else the checkout the code runs
from). Recorded in every job's first audit line and in its report."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from pathlib import Path

PACKAGE = "identity-replication-daemon"
_SHA = re.compile(r"[0-9a-f]{40}")


@functools.cache
def engine_version() -> str:
    """"0.1.0" or "0.1.0+g<12 hex digits>" (the commit)."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    commit = git_commit()
    return f"{version}+g{commit[:12]}" if commit else version


@functools.cache
def git_commit() -> str | None:
    """The full commit hash, or None. Reads .git's files (no git program needed)."""
    given = os.environ.get("IDREP_GIT_COMMIT", "").strip().lower()
    if _SHA.fullmatch(given):
        return given
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text("utf-8").strip()
        if not head.startswith("ref: "):
            return head if _SHA.fullmatch(head) else None
        ref = head[5:]
        if (git / ref).is_file():
            commit = (git / ref).read_text("utf-8").strip()
            return commit if _SHA.fullmatch(commit) else None
        for line in (git / "packed-refs").read_text("utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.fullmatch(parts[0]):
                return parts[0]
    except OSError:
        return None
    return None
