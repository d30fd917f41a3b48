"""Command line: run the daemon.

    python -m daemon --config config.toml [--inbox DIR] [--outbox DIR] [--failed DIR] [--work DIR]
                     [--metrics-port N] [--metrics-host ADDR] [--daemon-id ID] [--poll] [--backend local|ray] [--demo]
    python -m daemon status --config config.toml [--inbox DIR] [--outbox DIR] [--failed DIR] [--work DIR]
                     [--last N] [--json]
    python -m daemon health [--config config.toml] [--port N]

`status` reads the shared folders (queue, claims and their leases, progress, last results) and
needs no running daemon: see daemon/status.py. `health` asks a running daemon's /metrics
whether it claims jobs (the container's healthcheck).

Settings come from config.toml's [daemon] table; flags override them (flag paths are relative
to the current folder). --config and --log-level go before or after `status` and `health`, and
so do the folders for `status` (the container's entry point names them, and `status` may follow
it); the daemon's other options are ignored there. Logs are JSON lines on stdout, one event per
line, each with `daemon_id`; a refusal to start is one of them, `refused_to_start`, and only there.
SIGTERM (or Ctrl-C) stops claiming, lets the job in flight reach its next safe point (the next
denoising step in seed discovery and rendering, the next checkpoint in training), releases its
claim (it resumes later, here or in another daemon) and exits 0; a second signal exits at once.

Exit codes: 0 stopped cleanly, 2 refused to start (configuration, installation, a folder that
cannot be written, a daemon id already in use; the message says what to fix), 1 anything else;
141 its output's reader went away (`status | head -1`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import prometheus_client
import structlog

from engine import (
    ConfigError,
    Settings,
    configure_json_logging,
    find_config,
    global_options,
    read_settings,
    run_command,
)

FOLDERS = ("inbox", "outbox", "failed", "work")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "status":
        return status_main(args)
    if args.command == "health":
        return health_main(args)
    return _run_daemon(args, parser)


def _parser() -> argparse.ArgumentParser:
    """One parser: the daemon's own options on the main parser (running it has no command name),
    `status` and `health` as sub-commands. The options a command shares with the daemon
    (engine.cli.global_options; the folders, for `status`) are declared on the command too, with
    SUPPRESS as default, so that one given before the command is not undone by its absence after it."""
    parser = argparse.ArgumentParser(prog="python -m daemon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[global_options(after_command=False)])
    parser.add_argument("--inbox", type=Path, help="the watched folder (overrides [daemon] inbox)")
    parser.add_argument("--outbox", type=Path, help="where finished jobs go (overrides [daemon] outbox)")
    parser.add_argument("--failed", type=Path, help="where refused/failed jobs go (default: failed/ beside the outbox)")
    parser.add_argument("--work", type=Path, help="claimed jobs, on the inbox's file system (default: work/ beside the inbox)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9108; 0: any free port, logged)")
    parser.add_argument("--metrics-host", help="address the metrics server listens on (default 127.0.0.1)")
    parser.add_argument("--daemon-id", help="unique id among the daemons sharing this inbox (default: <host>-<pid>)")
    parser.add_argument("--poll", action="store_true", help="poll the inbox instead of native events (a network share)")
    parser.add_argument("--backend", choices=("local", "ray"), help="where claimed jobs run: this process, or a Ray cluster ([daemon.ray]; "
                                                                    "overrides [daemon] backend)")
    parser.add_argument("--demo", action="store_true", help="use the tiny generated diffusion model (noise renders, marked as demo)")
    after_command = [global_options(after_command=True)]
    commands = parser.add_subparsers(dest="command", metavar="[status|health]", help="without one: run the daemon")

    status = commands.add_parser("status", parents=after_command, help="the shared folders: queue, claims and their leases, progress, "
                                 "last results (no daemon needed)", description="queue, claims and their leases, progress, last results")
    for name in FOLDERS:
        status.add_argument(f"--{name}", type=Path, default=argparse.SUPPRESS, help=f"override [daemon] {name}")
    status.add_argument("--last", type=int, default=10, help="how many results to list")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    health = commands.add_parser("health", parents=after_command, help="the container's healthcheck", description=health_main.__doc__)
    health.add_argument("--port", type=int, default=None, help="the metrics port (default: [daemon] metrics_port)")
    health.add_argument("--timeout", type=float, default=5.0)
    return parser


def _run_daemon(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from daemon.service import Service, default_daemon_id

    try:
        settings, daemon = _load_config(args.config)
    except ConfigError as error:
        configure_logging(args.log_level, args.daemon_id or default_daemon_id())  # the config's daemon_id is not known
        return _refused(error)
    overrides: dict[str, Any] = {}
    for name in FOLDERS:
        if getattr(args, name) is not None:
            overrides[name] = str(getattr(args, name).resolve())
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            parser.error("--metrics-port must be 0-65535")
        overrides["metrics_port"] = args.metrics_port
    if args.metrics_host is not None:
        overrides["metrics_host"] = args.metrics_host
    if args.poll:
        overrides["network_share"] = True
    if args.backend is not None:
        overrides["backend"] = args.backend
    daemon = dataclasses.replace(daemon, **overrides, daemon_id=args.daemon_id or daemon.daemon_id or default_daemon_id())
    configure_logging(args.log_level, daemon.daemon_id)
    prometheus_client.disable_created_metrics()  # *_created series only clutter a daemon's /metrics

    service = Service(settings, daemon, demo=args.demo)
    signals_seen = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            structlog.get_logger("daemon").warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            os._exit(1)  # the claim stays; it is taken over when its lease expires
        service.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return service.run()
    except ConfigError as error:
        return _refused(error)
    except Exception:  # noqa: BLE001 - logged with its traceback; claims are left to their leases
        structlog.get_logger("daemon").exception("daemon_crashed")
        return 1


def status_main(args: argparse.Namespace) -> int:
    """`python -m daemon status`: the folders the daemons share, as a person at a terminal wants them."""
    import json

    from daemon.settings import DaemonPaths
    from daemon.status import daemon_status, format_daemon_status

    try:
        settings, daemon = _load_config(args.config)
    except ConfigError as error:
        print(f"cannot read the configuration: {error}", file=sys.stderr)
        return 2
    overrides = {name: str(getattr(args, name).resolve()) for name in FOLDERS if getattr(args, name) is not None}
    paths = DaemonPaths.resolve(dataclasses.replace(daemon, **overrides), settings.root)  # as the daemon itself resolves them
    status = daemon_status(paths.inbox, paths.work, paths.outbox, paths.failed, stable_seconds=daemon.stable_seconds, last=args.last)
    print(json.dumps(status.to_plain(), indent=2) if args.json else format_daemon_status(status), end="\n" if args.json else "")
    return 0


def health_main(args: argparse.Namespace) -> int:
    """`python -m daemon health`: the container's healthcheck. Reads the daemon's own /metrics and
    prints one line: "ready", "waiting for models: ...", "claiming paused: ..." or why /metrics
    did not answer. Exit 0 only when ready (docker shows the line in `docker inspect`)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        _settings, daemon = _load_config(args.config)
    except ConfigError as error:
        print(f"unhealthy: cannot read the configuration: {error}")
        return 1
    port = args.port if args.port is not None else daemon.metrics_port
    host = "127.0.0.1" if daemon.metrics_host in ("0.0.0.0", "::", "") else daemon.metrics_host
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"  # an IPv6 address (::1)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - our own loopback port
            text = response.read().decode("utf-8")
    except OSError as exc:
        print(f"unhealthy: {url} did not answer ({exc}); the daemon is starting, stopped or hung")
        return 1
    values = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples if not sample.labels}
    missing = int(values.get("idrep_models_missing", 0))
    if missing:
        print(f"waiting for models: {missing} missing (the models_missing log line names each and where it goes; "
              "python -m engine models check)")
        return 1
    if values.get("idrep_ready", 0) != 1:
        print("claiming paused: a folder the daemon writes failed its probe, or it is still starting (see the claiming_paused log line)")
        return 1
    print("ready")
    return 0


def _refused(error: ConfigError) -> int:
    """A refusal to start, shown once: the `refused_to_start` line on stdout, with the daemon's
    other events (where its log collector and the tests read them); exit code 2."""
    more = error.unstated_problems()  # the message names the first few
    structlog.get_logger("daemon").error("refused_to_start", code=error.code, message=error.message,
                                         **({"more_problems": [str(problem) for problem in more]} if more else {}))
    return 2


def configure_logging(level: str, daemon_id: str) -> None:
    """JSON event lines on stdout for every logger of the process (engine's too), each with daemon_id."""

    def add_daemon_id(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("daemon_id", daemon_id)
        return event_dict

    configure_json_logging(level, sys.stdout, extra=add_daemon_id)


def _load_config(given: Path | None) -> tuple[Settings, Any]:
    """config.toml (the given one, else ./config.toml if present, else built-in defaults) and
    its [daemon] table; ConfigError names every problem."""
    from daemon.settings import load_daemon_settings

    config_path = find_config(given)
    settings = read_settings(config_path)  # with the lab's plug-in kinds, before any job folder is read
    return settings, load_daemon_settings(settings, str(config_path or "built-in defaults"))


if __name__ == "__main__":
    run_command(main)  # exits: quietly on a closed pipe (`status | head -1`), without the interpreter's slow teardown
