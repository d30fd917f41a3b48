"""What the two command lines (`python -m engine`, `python -m daemon`) share: where config.toml
is, the folders it names, the options every command takes, JSON log lines, and how a command
ends. One owner, so that the CLIs cannot drift apart (issue 14)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

import structlog

from engine.config import Settings
from engine.jobfolder import Folders, FolderSettings
from engine.schema import build_section

DEFAULT_CONFIG = "config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
# 128 + SIGPIPE: what a shell reports for a program ended by a reader that went away (`| head -1`).
# Apart from every code the commands document (0-3): `verify-audit`'s 1 means "failed".
BROKEN_PIPE_EXIT = 141


def find_config(given: Path | None) -> Path | None:
    """The config file a CLI reads: the one given, else ./config.toml if there is one, else None
    (the built-in defaults)."""
    if given is not None:
        return given
    default = Path(DEFAULT_CONFIG)
    return default if default.is_file() else None


def read_settings(given: Path | None) -> Settings:
    """config.toml (find_config) with the lab's plug-in kinds it names loaded (engine.plugins),
    before the command reads a job folder; ConfigError for a bad file or plug-in."""
    from engine.plugins import load_plugins

    settings = Settings.load(find_config(given))
    load_plugins(settings)
    return settings


def global_options(*, after_command: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its sub-command, as a parent parser
    (`parents=[...]`). The main parser's copy holds the defaults; each sub-command's copy
    (`after_command=True`) defaults to SUPPRESS, because argparse copies a sub-parser's values
    over the main parser's: a default there would undo `--config X` given before the sub-command."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, default=argparse.SUPPRESS if after_command else None,
                         help="config.toml (default: ./config.toml if present, else built-in defaults)")
    options.add_argument("--log-level", default=argparse.SUPPRESS if after_command else "info", choices=LOG_LEVELS,
                         help="the least level of the JSON log lines (default info)")
    return options


def configured_folders(settings: Settings, where: str = DEFAULT_CONFIG) -> Folders:
    """The folders config.toml's [daemon] table names (its other keys are the daemon's to check);
    ConfigError naming each bad one."""
    return build_section(FolderSettings, settings.foreign.get("daemon", {}), "daemon", where, only_known=True).folders(settings.root)


def configure_json_logging(level: str, stream: IO[str], *, extra: Callable[[Any, str, dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """One JSON event per line on `stream`, sorted keys, UTC ISO timestamps, for every logger of
    the process (the engine's too); `extra` is one more processor (the daemon's daemon_id)."""
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    if extra is not None:
        processors.append(extra)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(sort_keys=True, default=str),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Not cached: a module-level logger first used under this configuration would keep its
        # stream for good, and a process that configures logging again (a test, a program that
        # embeds the engine) would write to a closed stream ("I/O operation on closed file",
        # seen when engine.identity.faces began to log at load). The cost is one config look-up per line.
        cache_logger_on_first_use=False,
    )


def run_command(main: Callable[[], int]) -> NoReturn:
    """A CLI's entry point: run `main` and leave the process at once with its exit code.

    A reader that stops early (`verify-audit ... | head -1`) closes the pipe; the next write or
    the last flush then raises BrokenPipeError. That ends the command quietly with
    BROKEN_PIPE_EXIT instead of a traceback, as the recipe in Python's `signal` docs does:
    /dev/null takes stdout's place, so that nothing flushes into the closed pipe again.

    os._exit skips the interpreter's teardown of torch, transformers and onnxruntime (about 2 s
    per process, measured): every file the command writes is already fsynced, its log lines are
    flushed here, and no thread of it has work left."""
    try:
        try:
            exit_code = main()
        except SystemExit as stop:  # argparse: --help, a usage error (its text is already written)
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)  # sys.exit("message"), as the interpreter would show it
            exit_code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        exit_code = BROKEN_PIPE_EXIT
    sys.stderr.flush()
    os._exit(exit_code)
