"""A lab's own job kinds, as plug-ins: config.toml's `[kinds] plugins` names Python modules, each
with `KINDS`, a tuple of engine.kinds.Kind (which may bring stages of their own:
`Kind.stage_modules`). Both command lines load them right after reading config.toml, before any
job folder is read (`python -m engine`, `python -m daemon`), and so does every Engine (a Ray
worker reads no config.toml): a job.toml's `kind` may then name them like a built-in kind.

A plug-in that cannot be imported, has no KINDS, or names a kind or a stage that is taken is a
refusal to start (ConfigError naming the key and the module; the CLIs exit 2): a lab whose kind
silently went missing would fail each of its jobs as "not a job kind" instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from engine.errors import ConfigError, Problem
from engine.fsutil import sha256_file
from engine.kinds import Kind, register_kind

if TYPE_CHECKING:
    from engine.config import Settings

KEY = "kinds.plugins"


def load_plugins(settings: Settings) -> None:
    """Import every module of `[kinds] plugins` and register its KINDS. Loading one again is a
    no-op (the same Kind objects register once)."""
    for module_name in settings.kinds.plugins:
        _load(module_name)


def _load(module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of a lab's module is the refusal, named
        raise _refused(module_name, f"cannot be imported ({type(exc).__name__}: {exc})") from None
    kinds = getattr(module, "KINDS", None)
    if not isinstance(kinds, tuple) or not kinds or not all(isinstance(kind, Kind) for kind in kinds):
        raise _refused(module_name, "has no KINDS (a tuple of engine.kinds.Kind)")
    for kind in kinds:
        try:
            register_kind(kind)
        except ValueError as exc:
            raise _refused(module_name, str(exc)) from None


def _refused(module_name: str, reason: str) -> ConfigError:
    problem = Problem(KEY, f"the plug-in {module_name!r}: {reason}")
    return ConfigError("invalid_config", str(problem), problems=(problem,))


def kind_code(kind: Kind) -> dict[str, str]:
    """module -> sha256 of its source file, for the code of a kind from outside engine/ (the
    module defining its spec, and each stage it brings): the job_started line records it, as it
    records the engine's own version and commit, so the evidence names the code that made it.
    {} for a built-in kind."""
    modules = {kind.spec.__module__, *kind.stage_modules.values()}
    code: dict[str, str] = {}
    for name in sorted(m for m in modules if m != "engine" and not m.startswith("engine.")):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        code[name] = sha256_file(origin) if origin and origin not in ("built-in", "frozen") else "no source file"
    return code
