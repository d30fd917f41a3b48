"""Command line: run one job, verify an audit trail, make an example subject.

    python -m engine run inbox/alice [--outbox outbox] [--until embed] [--config config.toml]
    python -m engine verify-audit outbox/alice/<job-id> [--trusted-key PUB.pem] [--trusted-ca CA.pem] [--allow-unsigned]
    python -m engine verify-journal [outbox] [--failed DIR] [--trusted-key PUB.pem] [--trusted-ca CA.pem] [--allow-unsigned]
    python -m engine keys init --out DIR [--lab NAME]
    python -m engine report outbox/alice/<job-id> [--out DIR]
    python -m engine status [--outbox outbox] [--inbox inbox] [--last 10] [--json]
    python -m engine example inbox/astronaut
    python -m engine models make-demo models/demo
    python -m engine models check [--until embed] [--demo] [--no-hash] [--json]

--config and --log-level go before or after the command. A folder not given (the outbox, failed/,
the inbox) is the one config.toml's [daemon] table names, as the daemon uses it; an --outbox given
brings its neighbours instead: failed/ and inbox/ beside it. A reader that closes the output early
(`| head -1`) ends a command quietly with exit code 141.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


from engine.provenance.verification import verify_audit
from engine.cli import Folders, configure_json_logging, configured_folders, find_config, global_options, read_settings, run_command
from engine.config import Settings
from engine.errors import ConfigError, Problem, unstated_problems
from engine.example import write_example_subject
from engine.kinds import all_stage_names
from engine.lifecycle import JobOutcome
from engine.status import ProgressObserver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[global_options(after_command=False)])
    after_command = [global_options(after_command=True)]  # every sub-command takes them too
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=after_command, help="run (or resume) one job folder")
    run.add_argument("job", type=Path, help="the job folder: 1-3 photos + job.toml")
    run.add_argument("--outbox", type=Path, default=None, help="where the finished job goes (<outbox>/<subject>/<job-id>/); "
                     "its work area is <outbox>/.work/ (default: [daemon] outbox of config.toml)")
    run.add_argument("--failed", type=Path, default=None, help="where refused jobs go (default: failed/ beside --outbox, else "
                     "[daemon] failed of config.toml)")
    run.add_argument("--until", choices=all_stage_names(), default=None, help="stop after this stage")
    run.add_argument("--job-id", default=None, help="resume this job id (default: the unfinished job of this folder, or a new one)")
    run.add_argument("--demo", action="store_true", help="use the tiny generated diffusion model (noise renders, marked as demo); also models.base = \"demo\"")

    verify = commands.add_parser("verify-audit", parents=after_command,
                                 help="check a job's audit chain, manifest, inputs, signed head, journal line and images' credentials")
    verify.add_argument("job_out", type=Path)
    journal = commands.add_parser("verify-journal", parents=after_command,
                                  help="check a whole outbox: every job is in its journal, and each is as signed")
    journal.add_argument("outbox", type=Path, nargs="?", default=None, help="the outbox (default: [daemon] outbox of config.toml)")
    journal.add_argument("--failed", type=Path, default=None, help="the failed jobs' folder (default: failed/ beside the outbox given, "
                         "else [daemon] failed of config.toml)")
    for checker in (verify, journal):
        checker.add_argument("--trusted-key", type=Path, default=None,
                             help="the lab's audit-signing.pub.pem (default: the one in [trust] keys of --config, if any)")
        checker.add_argument("--trusted-ca", type=Path, default=None, help="the lab CA, lab-ca.cert.pem (default: the one in [trust] keys)")
        checker.add_argument("--require-signed", action="store_true",
                             help="fail an unsigned job (or journal) even without a trusted key (with one, signed is required anyway)")
        checker.add_argument("--allow-unsigned", action="store_true",
                             help="with a trusted key, accept unsigned jobs and journal lines instead of failing them (a lab that ran "
                                  "without keys for a while)")

    keys = commands.add_parser("keys", parents=after_command, help="the lab's signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_init = key_commands.add_parser("init", parents=after_command,
                                        help="make a new set of lab keys (offline): audit signing key, lab CA, content signer")
    keys_init.add_argument("--out", type=Path, required=True, help="a new folder for them (private keys are written 0600)")
    keys_init.add_argument("--lab", default="Forensic lab", help="the lab's name, for the certificates")

    report = commands.add_parser("report", parents=after_command,
                                 help="regenerate a job's report.html from its folder (byte-identical for a finished job)")
    report.add_argument("job_out", type=Path)
    report.add_argument("--out", type=Path, default=None, help="write the report here instead of into the job folder")

    status = commands.add_parser("status", parents=after_command, help="queue, jobs in progress and last results, from the folders")
    status.add_argument("--outbox", type=Path, default=None, help="the outbox (default: [daemon] outbox of config.toml)")
    status.add_argument("--inbox", type=Path, default=None, help="count the folders waiting here, if it exists (default: inbox/ beside "
                        "--outbox, else [daemon] inbox of config.toml)")
    status.add_argument("--failed", type=Path, default=None, help="failed jobs (default: failed/ beside --outbox, else [daemon] failed)")
    status.add_argument("--last", type=int, default=10, help="how many results to list")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    example = commands.add_parser("example", parents=after_command, help="write an example subject folder from a photo a package ships")
    example.add_argument("folder", type=Path)

    models = commands.add_parser("models", parents=after_command, help="model utilities")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    make_demo = model_commands.add_parser("make-demo", parents=after_command,
                                          help="build the tiny demo diffusion model (random weights, fixed seed) into a folder")
    make_demo.add_argument("folder", type=Path)
    convert = model_commands.add_parser("convert-faceid", parents=after_command,
                                        help="stage a published IP-Adapter-FaceID .bin as a folder holding faceid.safetensors "
                                             "(read with torch's weights-only unpickler; the engine never unpickles at run time)")
    convert.add_argument("bin", type=Path)
    convert.add_argument("folder", type=Path, help="e.g. <models>/faceid; then set models.faceid = \"faceid\"")
    check = model_commands.add_parser(
        "check", parents=after_command,
        help="pre-flight: every model the configuration uses, staged or missing, with path, size and sha256 "
             "(exit 0 only when every needed one is there)")
    check.add_argument("--until", choices=all_stage_names(), default=None, help="only the models of the stages up to this one")
    check.add_argument("--demo", action="store_true", help="as `run --demo` would (the tiny generated diffusion model)")
    check.add_argument("--no-hash", action="store_true", help="sizes only, no sha256 (quick)")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")

    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "verify-audit":
        return _verify(args.job_out, *_trust_anchors(args), args.require_signed, args.allow_unsigned)
    if args.command == "verify-journal":
        try:
            folders = _folders(args)
        except ConfigError as error:
            print(f"cannot read the configuration: {error}", file=sys.stderr)
            return 2
        return _verify_journal(folders.outbox, folders.failed, *_trust_anchors(args), args.require_signed, args.allow_unsigned)
    if args.command == "keys":
        return _keys_init(args.out, args.lab)
    if args.command == "report":
        return _report(args.job_out, args.out, args.config)
    if args.command == "status":
        return _status(args)
    if args.command == "example":
        folder = write_example_subject(args.folder)
        print(f"example subject written to {folder}")
        return 0
    if args.command == "models" and args.models_command == "check":
        return _models_check(args)
    if args.command == "models" and args.models_command == "convert-faceid":
        from engine.identity.faceid import WEIGHTS, check_folder, convert_bin

        try:
            folder = convert_bin(args.bin, args.folder)
            check_folder(folder, str(args.folder))
        except (ConfigError, OSError) as error:
            print(f"cannot convert {args.bin}: {error}", file=sys.stderr)
            return 2
        print(f"FaceID adapter staged as {folder / WEIGHTS}")
        return 0
    if args.command == "models":
        from engine.diffusion.models import make_demo_model

        folder = make_demo_model(args.folder)
        print(f"demo model (random weights: renders are noise) written to {folder}")
        return 0
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done (or stopped as asked), 1 the job failed (failed/ holds it), 2 refused to
    start (configuration, models or folders: the message says what to fix), 3 held (the disk, the
    share or a permission is at fault: nothing was lost, run it again once that is fixed)."""
    from engine.runner import Engine  # imports the model stack; keep `verify-audit` light

    try:
        settings = read_settings(args.config)
        folders = _folders(args, settings)
        Engine.check_folders(folders.outbox, folders.failed)
        engine = Engine(settings, demo=args.demo, observer=ProgressObserver(), until=args.until)
        result = engine.run_job(args.job, folders.outbox, job_id=args.job_id, until=args.until, failed_dir=folders.failed)
    except ConfigError as error:
        print(f"refused to start: {error}", file=sys.stderr)  # the one place a refusal is shown; nothing logs it
        return 2
    if result.outcome == JobOutcome.FAILED:
        print(f"job {result.job_id} failed: {result.error['code']}: {result.error['message']}", file=sys.stderr)
        problems = [Problem(problem["where"], problem["reason"]) for problem in result.error.get("problems", [])]
        for problem in unstated_problems(result.error["message"], problems):
            print(f"  - {problem}", file=sys.stderr)
        print(f"inputs and error.json are in {result.output_dir}", file=sys.stderr)
        return 1
    if result.outcome == JobOutcome.HELD:
        print(f"job {result.job_id} held: {result.error['code']}: {result.error['message']}", file=sys.stderr)
        return 3
    print(json.dumps({"job_id": result.job_id, "subject": result.subject, "outcome": result.outcome, "output": str(result.output_dir)}))
    return 0


def _folders(args: argparse.Namespace, settings: Settings | None = None) -> Folders:
    """The folders a command acts on. Each given on the command line is taken from the current
    folder. An --outbox given brings its neighbours: failed/ and inbox/ beside it (a layout of
    its own, as before config.toml named folders for the engine). Without one, the folders of
    config.toml's [daemon] table, taken from config.toml's folder as the daemon takes them.
    ConfigError when config.toml cannot be read."""
    given = {name: getattr(args, name, None) for name in ("inbox", "outbox", "failed")}  # `run` has no --inbox
    if given["outbox"] is not None:
        outbox = given["outbox"].resolve()
        folders = Folders(inbox=outbox.parent / "inbox", outbox=outbox, failed=outbox.parent / "failed", work=outbox.parent / "work")
    else:
        config = find_config(args.config)
        folders = configured_folders(settings or Settings.load(config), str(config or "the built-in defaults"))
    return dataclasses.replace(folders, **{name: path.resolve() for name, path in given.items() if path is not None})


def _models_check(args: argparse.Namespace) -> int:
    """Exit codes: 0 every needed model is staged, 1 one or more are missing, 2 the configuration is unreadable."""
    from engine.inventory import format_inventory, inventory

    try:
        settings = read_settings(args.config)  # a plug-in kind's stages use models too
        entries = inventory(settings, demo=args.demo, until=args.until)
    except ConfigError as error:
        print(f"cannot check the models: {error}", file=sys.stderr)
        return 2
    described = [entry.describe(hashes=not args.no_hash) for entry in entries]
    if args.json:
        print(json.dumps({"models_dir": str(settings.models_dir), "models": described,
                          "missing": [entry.key or entry.role for entry in entries if entry.missing]}, indent=2))
    else:
        print(format_inventory(entries, described, settings.models_dir), end="")
    return 1 if any(entry.missing for entry in entries) else 0


def _trust_anchors(args: argparse.Namespace) -> tuple[object | None, bytes | None]:
    """The reviewer's public key and lab CA: the flags, else the files of [trust] keys in --config."""
    from engine.provenance.trust import AUDIT_PUBLIC_KEY, CA_CERT, load_public_key

    keys_dir = None
    config = find_config(args.config)
    if config is not None and (args.trusted_key is None or args.trusted_ca is None):
        try:
            keys_dir = Settings.load(config).keys_dir
        except ConfigError:
            keys_dir = None
    key_path = args.trusted_key or (keys_dir / AUDIT_PUBLIC_KEY if keys_dir and (keys_dir / AUDIT_PUBLIC_KEY).is_file() else None)
    ca_path = args.trusted_ca or (keys_dir / CA_CERT if keys_dir and (keys_dir / CA_CERT).is_file() else None)
    return (load_public_key(key_path) if key_path else None), (Path(ca_path).read_bytes() if ca_path else None)


def _verify(job_out: Path, trusted_key: object | None, trusted_ca: bytes | None, require_signed: bool, allow_unsigned: bool) -> int:
    report = verify_audit(job_out, trusted_key=trusted_key, trusted_ca=trusted_ca, allow_unsigned=allow_unsigned)
    trust = report.trust
    signed = trust.signed if trust is not None else "unsigned"
    if require_signed and signed not in ("trusted", "signed"):
        report.problems.append(f"the job is {signed}, and --require-signed was given")
    if report.ok:
        if report.verdict == "failed":
            line = (f"OK (a failed job, recorded intact): {report.lines} audit lines chained, {report.files_checked} files match its "
                    f"manifest (inputs/, error.json, audit log)")
        else:
            line = f"OK: {report.lines} audit lines chained, {report.files_checked} files match the manifest; head {report.head}"
        if trust is not None:
            line += f"; signed head: {signed}" + (f" (key {trust.key_fingerprint[:16]})" if trust.key_fingerprint else "")
            if report.verdict != "failed":
                line += f"; journal: {trust.journal}"
            if trust.credentials:
                line += "; Content Credentials: " + ", ".join(f"{count} {state}" for state, count in sorted(trust.credentials.items()))
        print(line)
        for note in report.notes + (trust.notes if trust is not None else []):
            print(f"  note: {note}")
        return 0
    print(f"FAILED: {job_out}", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def _verify_journal(outbox: Path, failed: Path | None, trusted_key: object | None, trusted_ca: bytes | None, require_signed: bool,
                    allow_unsigned: bool) -> int:
    from engine.provenance.verification import verify_journal

    report = verify_journal(outbox, failed, trusted=trusted_key, trusted_ca=trusted_ca, allow_unsigned=allow_unsigned)
    if require_signed and report.signed not in ("trusted", "signed"):
        report.problems.append(f"the journal is {report.signed}, and --require-signed was given")
    if report.ok:
        print(f"OK: {report.entries} journal lines chained ({report.signed}), {report.jobs_checked} jobs as signed; "
              f"journal head {report.head} (keep a note of it: a journal cut back to an earlier head looks whole)")
        for note in report.notes:
            print(f"  note: {note}")
        if report.signed == "unsigned":
            print("  note: UNSIGNED: no lab key signed this journal; it shows a removed or edited line, but someone who can write the "
                  "share could rewrite it consistently")
        return 0
    print(f"FAILED: {outbox}", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def _keys_init(out: Path, lab: str) -> int:
    from engine.provenance.trust import CA_KEY, make_lab_keys

    try:
        files = make_lab_keys(out, lab)
    except ConfigError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    print(f"lab keys written to {out}:")
    for name, path in files.items():
        print(f"  {name}  ({oct(path.stat().st_mode & 0o777)})")
    print(f"Set [trust] keys = \"{out}\" in config.toml (mount it read-only in the container). Move {CA_KEY} somewhere offline: it is "
          "needed only to issue a new content-signer certificate. Give reviewers audit-signing.pub.pem and lab-ca.cert.pem.")
    return 0


def _report(job_out: Path, out: Path | None, config: Path | None) -> int:
    from engine.kinds import known_kinds
    from engine.layout import AUDIT_FILE, REPORT_FILE
    from engine.report import regenerate_report

    if not (job_out / AUDIT_FILE).is_file():
        print(f"{job_out}: not a job folder (no {AUDIT_FILE})", file=sys.stderr)
        return 2
    try:
        read_settings(config)  # a plug-in kind's report has that kind's sections
    except ConfigError as error:
        print(f"the configuration cannot be read, so no plug-in kind is loaded: {error}", file=sys.stderr)
    kind = _recorded_kind(job_out / AUDIT_FILE)
    if kind not in known_kinds():
        print(f"{job_out}: a job of kind {kind!r}, which is not known here (known: {', '.join(known_kinds())}); "
              "name the module that defines it in config.toml's [kinds] plugins", file=sys.stderr)
        return 2
    result = regenerate_report(job_out, out)
    if not result.ok:
        print(f"refused: regenerating into {job_out} would break its manifest; nothing written:", file=sys.stderr)
        for conflict in result.conflicts:
            print(f"  - {conflict}", file=sys.stderr)
        print("  write it elsewhere with --out DIR", file=sys.stderr)
        return 1
    if result.unchanged:
        print(f"{job_out / REPORT_FILE}: regenerated byte-identical to the manifest ({len(result.unchanged)} files)")
    else:
        print(f"report written: {result.written[-1]}")
    return 0


def _recorded_kind(audit: Path) -> str:
    """The kind the audit log's first line (job_started) names; the default kind for a line
    without one (older jobs) or one that cannot be read (the report then says what is wrong)."""
    from engine.kinds import DEFAULT_KIND

    try:
        with open(audit, "rb") as file:
            first = json.loads(file.readline(1 << 20))
        return str(first.get("kind") or DEFAULT_KIND) if isinstance(first, dict) else DEFAULT_KIND
    except (OSError, ValueError):
        return DEFAULT_KIND


def _status(args: argparse.Namespace) -> int:
    from engine.status import format_status, outbox_status

    try:
        settings = read_settings(args.config)  # with the lab's plug-in kinds: their running jobs' stages
    except ConfigError as error:
        if args.outbox is None:  # the folders are config.toml's: nothing to look at without it
            print(f"cannot read the configuration: {error}", file=sys.stderr)
            return 2
        # A read-only look at a given outbox still answers (a lab mending its config.toml needs
        # it most); a plug-in kind's job then shows without its stages' progress.
        print(f"the configuration cannot be read, so no plug-in kind is loaded: {error}", file=sys.stderr)
        settings = None
    try:
        folders = _folders(args, settings)
    except ConfigError as error:
        print(f"cannot read the configuration: {error}", file=sys.stderr)
        return 2
    inbox = folders.inbox if folders.inbox.is_dir() else None
    status = outbox_status(folders.outbox, inbox=inbox, failed=folders.failed, last=args.last)
    if args.json:
        print(json.dumps(status.to_plain(), indent=2))
    else:
        print(format_status(status), end="")
    return 0


def _configure_logging(level: str) -> None:
    """JSON event lines on stderr (the CLI's, not the library's, choice)."""
    configure_json_logging(level, sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


if __name__ == "__main__":
    run_command(main)  # exits: quietly on a closed pipe (`| head -1`), without the interpreter's slow teardown
