"""One exception family for everything a job can be refused or failed for.

`JobError.code` is a stable machine-readable reason (it lands in `error.json` and in
metrics labels); `message` is for the person who has to fix the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (file and key path) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class JobError(Exception):
    """A job that cannot go on. Raised by stages, caught by the runner.

    code     stable identifier, e.g. ``invalid_job``, ``no_face_found``, ``pixel_limit``.
    message  one human sentence naming the file/key and the reason.
    problems every individual problem when there are several (job validation lists all at once).
    details  extra machine-readable facts for error.json (face boxes, drifts...).
    """

    code: str
    message: str
    problems: tuple[Problem, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        """The code and message, then each problem the message does not already state: what a
        command line prints, every problem once."""
        return "\n".join([f"{self.code}: {self.message}"] + [f"  - {p}" for p in self.unstated_problems()])

    def unstated_problems(self) -> list[Problem]:
        """The problems the message does not already state (see `unstated_problems`)."""
        return unstated_problems(self.message, self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "problems": [{"where": p.where, "reason": p.reason} for p in self.problems],
            "details": self.details,
        }


def unstated_problems(message: str, problems: Iterable[Problem]) -> list[Problem]:
    """The problems `message` does not already state. A message names the first few problems as
    "where: reason" (a config.toml with five problems names three), or is the one problem's
    reason; printing the list under it in full showed those twice."""
    return [problem for problem in problems if str(problem) not in message and problem.reason != message]


class ConfigError(JobError):
    """The daemon's/engine's own configuration (config.toml, staged models) is wrong.

    Not the job's fault: a lab must fix the installation, so callers refuse to start.
    """


class JobInterrupted(Exception):
    """A stop was requested (SIGTERM); the job stopped at a safe point and can be resumed."""

    def __init__(self, where: str) -> None:
        super().__init__(f"stopped at {where}")
        self.where = where


class OwnershipLost(JobInterrupted):
    """This process no longer owns the job (another daemon took its claim over, or its lease
    lapsed while it was frozen): it must stop at once and write nothing more, not even a line
    saying that it stopped. Raised by the owner's fence (see `Engine.run_job(fence=...)`)."""
