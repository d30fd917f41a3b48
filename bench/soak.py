"""Crash soak: SIGKILL the engine at random points of the demo job, resume, compare with a clean run.

    .venv/bin/python bench/soak.py [--kills 50] [--seed 0] [--workdir DIR] [--keep] [--config FILE]

What it does, in one working folder (a temporary one unless --workdir is given):
  1. writes the example subject (`python -m engine example inbox/astronaut`) and a config
     whose models folder is inside the working folder (the demo model is built there once);
  2. runs the job once, uninterrupted: `python -m engine --config C run inbox/astronaut
     --outbox clean/outbox --demo --job-id JOB_ID`, and records its outbox and how long each
     segment of the run took (startup, prepare, embed, train, verify, render, finish);
  3. in a fresh outbox per round, runs the very same command again and again, each time
     SIGKILLing the engine at a random moment, until a run ends by itself (exit 0): that
     round's job has finished under fire. Rounds repeat until --kills kills have landed;
  4. compares each round's finished job folder with the clean one, runs
     `python -m engine verify-audit` on it, and exits 1 on any difference.

Where the kills land. Drawing one delay uniformly over the whole clean run would almost
never hit prepare and embed (under 1 % of the run on the demo job). So each attempt draws,
from a seeded RNG, a *segment* still ahead of it (startup, a stage not yet complete in the
ledger, or finish = report, manifest and publish) and a fraction in [0, 1); it kills the
engine that fraction of the clean run's duration of that segment after the segment begins
in this attempt (seen as its `stage_started` line in the audit log; startup counts from the
process start). The segment a kill really landed in is read afterwards from the ledger
(state.json) and the audit log, so a resumed stage that runs shorter than in the clean run
shows up under the next one; "published" means the job was already in the outbox (killed
after the publishing rename, or a re-run of a published job killed before it returned).
A run that finishes before its kill counts as a miss.
Timings on a shared machine vary, so the seed fixes the plan (segments and fractions),
not the exact instants.

What must be identical to the clean run, and why:
  - every file of the job folder, byte for byte, including state.json (the ledger: stage
    fingerprints, artifact hashes, outcome: all a pure function of the job), except:
  - audit.jsonl: every line carries a timestamp and chains to the previous one, and a
    resumed job has lines that record its resumes (job_resumed, stage_invalidated with
    reason "interrupted", stage_skipped, train_resumed, partial_writes_removed,
    audit_torn_line_removed, ledger_rebuilt, resume_artifact_mismatch; stage_started's
    `continues`) and repeats of the lines of re-done work.
    It is compared by content: the job facts of the first line
    (inputs, spec, settings, versions, models, device); every other line without `ts`,
    `prev`, `hash`, `seconds` must equal the clean run's line of the same kind (event,
    stage, phase; a train_checkpoint's step, without the hashes of its files, which hold
    each process's own numpy and python RNG states), every repeat included, in the same
    order of first appearance; a
    `stage_invalidated` must say "interrupted" (any other reason means a completed stage's
    files changed after a kill); every job_resumed must carry the same job facts.
    `job_finished.manifest_sha256` is checked by verify-audit instead (see manifest.json).
  - report.html: a view of the audit log; it shows the audit head hash and the stage
    timestamps, so it differs between any two runs, killed or not. Its integrity is covered
    by verify-audit (it is listed in the manifest).
  - manifest.json: equal to the clean one once report.html's hash is left out of both; every
    other input, model and output hash must match.
Also: no failed/ entry, no work folder left behind, the ledger parses after every kill
and the audit chain of the work folder is intact after every kill.

Prints kills landed, kills per segment, resumes, files identical / total, the verify-audit
result and the wall time; writes the same as JSON to <workdir>/summary.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.provenance.audit import AUDIT_FILE, GENESIS, LEDGER_FILE, MANIFEST_FILE, line_hash  # noqa: E402  (light: no torch)
from engine.fsutil import sha256_file  # noqa: E402
from engine.jobfolder import SIGNATURE_FILE, WORK_DIR  # noqa: E402
from engine.jobfolder import work_dir as job_work_dir  # noqa: E402
from engine.ledger import LEDGER_VERSION  # noqa: E402

JOB_ID = "20260101T000000Z-soak00"  # fixed, so that the clean and the killed runs are comparable
SUBJECT = "astronaut"  # the example subject's name (engine/example.py)
REPORT_FILE = "report.html"
STARTUP, FINISH, PUBLISHED = "startup", "finish", "published"
# Audit events that only record how a job was resumed; absent from an uninterrupted run.
RESUME_EVENTS = frozenset({"job_resumed", "stage_invalidated", "stage_skipped", "train_resumed", "audit_torn_line_removed",
                           "partial_writes_removed", "ledger_rebuilt", "resume_artifact_mismatch"})
# `continues`: a stage_started line that goes on with an interrupted run of its stage says so.
VOLATILE_FIELDS = frozenset({"ts", "prev", "hash", "seconds", "continues"})
JOB_FACTS = ("source", "subject", "inputs", "spec", "settings", "versions", "models", "device", "demo")
POLL_SECONDS = 0.01
MAX_ATTEMPTS_PER_ROUND = 200  # a round that needs more makes no progress: a bug, not bad luck


@dataclass
class Attempt:
    round: int
    number: int
    target: str | None  # the segment the kill aimed at; None: no kill planned
    planned_delay_s: float | None
    killed: bool
    landed_in: str | None  # the segment the kill landed in (ledger + audit log after the kill)
    seconds: float  # from process start to exit or kill
    returncode: int | None


@dataclass
class RoundResult:
    round: int
    attempts: int
    kills: int
    files_total: int = 0
    files_identical: int = 0
    not_identical: list[str] = field(default_factory=list)  # byte for byte; each then checked by its own rule or reported
    verify_audit: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class Soak:
    """Everything one soak needs to know, and what it found."""

    workdir: Path
    config: Path
    python: str
    kills_wanted: int
    rng: random.Random
    timeout_s: float
    stages: list[str] = field(default_factory=list)  # from the clean run's ledger, in order
    segment_seconds: dict[str, float] = field(default_factory=dict)  # clean run
    clean_seconds: float = 0.0
    clean_dir: Path | None = None
    attempts: list[Attempt] = field(default_factory=list)
    rounds: list[RoundResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def source(self) -> Path:
        return self.workdir / "inbox" / SUBJECT

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")

    def command(self, outbox: Path) -> list[str]:
        return [self.python, "-m", "engine", "--config", str(self.config), "run", str(self.source), "--outbox", str(outbox),
                "--demo", "--job-id", JOB_ID]

    @property
    def kills_landed(self) -> int:
        return sum(1 for a in self.attempts if a.killed)


# ---------------------------------------------------------------------------- the runs

def prepare_workdir(soak: Soak, config: Path | None) -> None:
    soak.workdir.mkdir(parents=True, exist_ok=True)
    for earlier in ("clean", "soak", "logs", "inbox"):  # of an earlier soak in the same folder; models/ is kept
        shutil.rmtree(soak.workdir / earlier, ignore_errors=True)
    subprocess.run([soak.python, "-m", "engine", "example", str(soak.source)], cwd=REPO, env=soak.env(), check=True,
                   stdout=subprocess.DEVNULL)
    if config is None:
        soak.config.write_text(f'# written by bench/soak.py: built-in defaults, models inside the soak folder\n[paths]\nmodels = "{soak.workdir / "models"}"\n',
                               encoding="utf-8")
    else:
        shutil.copyfile(config, soak.config)


def clean_run(soak: Soak) -> None:
    """The uninterrupted run: its outbox is the reference, its audit log gives segment durations."""
    outbox = soak.workdir / "clean" / "outbox"
    started_wall = time.time()
    attempt = run_attempt(soak, outbox, round_number=0, number=1, target=None, delay=None)
    if attempt.returncode != 0:
        raise SystemExit(f"the clean run failed (exit {attempt.returncode}); see {log_path(soak, 0, 1, 'err')}")
    soak.clean_seconds = attempt.seconds
    soak.clean_dir = outbox / SUBJECT / JOB_ID
    ledger = json.loads((soak.clean_dir / LEDGER_FILE).read_text("utf-8"))
    soak.stages = [record["name"] for record in ledger["stages"]]
    lines = read_audit(soak.clean_dir / AUDIT_FILE)
    when = {(line["event"], line.get("stage")): _epoch(line["ts"]) for line in lines}
    soak.segment_seconds[STARTUP] = when[("job_started", None)] - started_wall
    for stage in soak.stages:
        soak.segment_seconds[stage] = when[("stage_finished", stage)] - when[("stage_started", stage)]
    soak.segment_seconds[FINISH] = started_wall + attempt.seconds - when[("stage_finished", soak.stages[-1])]


def soak_rounds(soak: Soak) -> None:
    """Rounds of kill-and-resume, each in a fresh outbox, until enough kills have landed."""
    round_number = 0
    while soak.kills_landed < soak.kills_wanted and not soak.problems:
        round_number += 1
        outbox = soak.workdir / "soak" / f"round-{round_number:02d}" / "outbox"
        result = RoundResult(round=round_number, attempts=0, kills=0)
        soak.rounds.append(result)
        while True:
            result.attempts += 1
            if result.attempts > MAX_ATTEMPTS_PER_ROUND:
                result.problems.append(f"no progress after {MAX_ATTEMPTS_PER_ROUND} attempts")
                break
            target, delay = plan_kill(soak, outbox) if soak.kills_landed < soak.kills_wanted else (None, None)
            attempt = run_attempt(soak, outbox, round_number, result.attempts, target, delay)
            soak.attempts.append(attempt)
            if attempt.killed:
                result.kills += 1
                result.problems += check_after_kill(outbox)
                if result.problems:
                    break
                continue
            if attempt.returncode != 0:
                err = log_path(soak, round_number, result.attempts, "err")
                result.problems.append(f"attempt {result.attempts} exited {attempt.returncode} (a crash on resume?): "
                                       f"{_tail(err)} (full log: {err})")
            break
        if not result.problems:
            compare_round(soak, outbox, result)
        soak.problems += [f"round {round_number}: {problem}" for problem in result.problems]
        print(f"round {round_number}: {result.kills} kills, {result.attempts} runs; files identical {result.files_identical}/{result.files_total}; "
              f"verify-audit {result.verify_audit or 'not run'}" + ("" if not result.problems else f"; {len(result.problems)} PROBLEMS"), flush=True)
        for problem in result.problems:
            print(f"  - {problem}", flush=True)


def plan_kill(soak: Soak, outbox: Path) -> tuple[str, float]:
    """A segment still ahead of this attempt, and a delay into it drawn from the clean run's duration of it."""
    ledger = _read_json(job_work_dir(outbox, JOB_ID) / LEDGER_FILE) or {}
    complete = {record["name"] for record in ledger.get("stages", []) if record["status"] == "complete"}
    ahead = [STARTUP] + [stage for stage in soak.stages if stage not in complete] + [FINISH]
    target = soak.rng.choice(ahead)
    return target, soak.rng.random() * soak.segment_seconds[target]


def run_attempt(soak: Soak, outbox: Path, round_number: int, number: int, target: str | None, delay: float | None) -> Attempt:
    """Run the command once; SIGKILL it `delay` seconds after segment `target` begins (if given)."""
    work_dir = job_work_dir(outbox, JOB_ID)
    final_dir = outbox / SUBJECT / JOB_ID
    tail = AuditTail(work_dir / AUDIT_FILE)
    (soak.workdir / "logs").mkdir(parents=True, exist_ok=True)
    with open(log_path(soak, round_number, number, "out"), "wb") as out, open(log_path(soak, round_number, number, "err"), "wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(soak.command(outbox), cwd=REPO, env=soak.env(), stdout=out, stderr=err)
        anchor = started if target == STARTUP else None
        killed = False
        while process.poll() is None:
            now = time.monotonic()
            if now - started > soak.timeout_s:
                process.kill()
                process.wait()
                soak.problems.append(f"round {round_number} attempt {number}: still running after {soak.timeout_s:.0f} s (hung?)")
                break
            if target is not None and anchor is None:
                for line in tail.read():
                    if _begins(target, line, soak.stages[-1]):
                        anchor = time.monotonic()
            if anchor is not None and now >= anchor + delay:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                killed = process.returncode == -signal.SIGKILL
                break
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - started
    landed = None
    if killed:
        tail.read()
        landed = landed_in(work_dir, final_dir, tail.attempt_began, soak.stages)
    attempt = Attempt(round_number, number, target, None if delay is None else round(delay, 3), killed, landed, round(seconds, 3), process.returncode)
    if round_number:
        what = (f"killed at {seconds:6.1f} s, aimed at {target} +{delay:.2f} s, landed in {landed}" if killed
                else f"ran to the end ({seconds:.1f} s, exit {process.returncode})" + (f"; the kill aimed at {target} +{delay:.2f} s missed" if target else ""))
        print(f"  round {round_number} run {number:2d}: {what}  [kills {soak.kills_landed + killed}/{soak.kills_wanted}]", flush=True)
    return attempt


def _begins(target: str, line: dict[str, Any], last_stage: str) -> bool:
    """Does this audit line mark the beginning of segment `target` in this attempt?"""
    if target == FINISH:
        return line.get("event") in ("stage_finished", "stage_skipped") and line.get("stage") == last_stage
    return line.get("event") == "stage_started" and line.get("stage") == target


def landed_in(work_dir: Path, final_dir: Path, attempt_began: bool, stages: list[str]) -> str:
    """The segment a kill landed in, from what it left on disk (the process is dead: nothing moves)."""
    if (final_dir / LEDGER_FILE).exists():
        return PUBLISHED  # after the rename into the outbox
    if not attempt_began:
        return STARTUP  # this run had not yet written its job_started/job_resumed line
    ledger = _read_json(work_dir / LEDGER_FILE) or {}
    status = {record["name"]: record["status"] for record in ledger.get("stages", [])}
    running = [name for name, state in status.items() if state == "running"]
    if running:
        return running[0]
    return next((stage for stage in stages if status.get(stage) != "complete"), FINISH)


class AuditTail:
    """New complete lines of a growing audit log (the engine appends one line per write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.attempt_began = False
        try:
            data = path.read_bytes()
            self.offset = data.rfind(b"\n") + 1  # a torn last line is cut off by the engine when it reopens
        except FileNotFoundError:
            self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []  # not yet written, or published (renamed away)
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = [json.loads(raw) for raw in data[:end].splitlines() if raw.strip()]
        self.attempt_began |= any(line.get("event") in ("job_started", "job_resumed") for line in lines)
        return lines


def check_after_kill(outbox: Path) -> list[str]:
    """What a kill may never leave behind: a ledger that does not parse, a broken audit chain."""
    problems = []
    work_dir, final_dir = job_work_dir(outbox, JOB_ID), outbox / SUBJECT / JOB_ID
    job_dir = final_dir if final_dir.is_dir() else work_dir
    ledger_path = job_dir / LEDGER_FILE
    if ledger_path.exists():
        try:
            ledger = json.loads(ledger_path.read_text("utf-8"))
            if ledger.get("version") != LEDGER_VERSION or ledger.get("job_id") != JOB_ID:
                problems.append(f"{ledger_path}: unexpected ledger {ledger.get('version')}/{ledger.get('job_id')}")
        except ValueError as exc:
            problems.append(f"{ledger_path}: corrupt ledger after a kill ({exc})")
    audit_path = job_dir / AUDIT_FILE
    if audit_path.exists():
        prev = GENESIS
        for number, raw in enumerate(audit_path.read_bytes().split(b"\n")[:-1], start=1):  # a torn last line is allowed
            record = json.loads(raw)
            if record.get("prev") != prev or record.get("hash") != line_hash(record):
                problems.append(f"{audit_path} line {number}: chain broken after a kill")
                break
            prev = record["hash"]
    return problems


# ---------------------------------------------------------------------------- the comparison

def compare_round(soak: Soak, outbox: Path, result: RoundResult) -> None:
    clean_dir, final_dir = soak.clean_dir, outbox / SUBJECT / JOB_ID
    if not final_dir.is_dir():
        result.problems.append(f"no finished job at {final_dir}")
        return
    leftovers = [p for p in (outbox / WORK_DIR, outbox.parent / "failed") if p.is_dir() and any(x.is_file() for x in p.rglob("*"))]
    result.problems += [f"left behind: {p} ({', '.join(sorted(x.relative_to(p).as_posix() for x in p.rglob('*') if x.is_file())[:5])})"
                        for p in leftovers]
    clean, final = every_file(clean_dir), every_file(final_dir)
    result.files_total = len(clean)
    result.files_identical = sum(1 for rel, digest in clean.items() if final.get(rel) == digest)
    result.not_identical = sorted(rel for rel in set(clean) | set(final) if clean.get(rel) != final.get(rel))
    for rel in sorted(set(clean) | set(final)):
        if rel in (AUDIT_FILE, MANIFEST_FILE, REPORT_FILE, SIGNATURE_FILE):  # signature.json: the signed head names the audit head
            continue
        if rel not in final:
            result.problems.append(f"{rel}: missing")
        elif rel not in clean:
            result.problems.append(f"{rel}: not in the clean run")
        elif clean[rel] != final[rel]:
            result.problems.append(f"{rel}: differs from the clean run{_json_difference(clean_dir / rel, final_dir / rel)}")
    result.problems += compare_manifests(clean_dir / MANIFEST_FILE, final_dir / MANIFEST_FILE)
    result.problems += compare_audits(clean_dir / AUDIT_FILE, final_dir / AUDIT_FILE)
    verify = subprocess.run([soak.python, "-m", "engine", "verify-audit", str(final_dir)], cwd=REPO, env=soak.env(),
                            capture_output=True, text=True)
    result.verify_audit = "OK" if verify.returncode == 0 else "FAILED"
    if verify.returncode != 0:
        result.problems.append(f"verify-audit: {verify.stderr.strip()}")


def compare_manifests(clean_path: Path, final_path: Path) -> list[str]:
    """Equal once report.html (a view of the run-specific audit log) is left out of both."""
    if not final_path.is_file():
        return [f"{MANIFEST_FILE}: missing"]
    clean, final = json.loads(clean_path.read_text("utf-8")), json.loads(final_path.read_text("utf-8"))
    for manifest in (clean, final):
        manifest.get("outputs", {}).pop(REPORT_FILE, None)
    problems = []
    for key in sorted(set(clean) | set(final)):
        if key == "outputs":
            outputs_clean, outputs_final = clean.get(key, {}), final.get(key, {})
            problems += [f"{MANIFEST_FILE}: outputs[{rel!r}] is {outputs_final.get(rel)}, clean {outputs_clean.get(rel)}"
                         for rel in sorted(set(outputs_clean) | set(outputs_final)) if outputs_clean.get(rel) != outputs_final.get(rel)]
        elif clean.get(key) != final.get(key):
            problems.append(f"{MANIFEST_FILE}: {key!r} differs from the clean run")
    return problems


def compare_audits(clean_path: Path, final_path: Path, also_volatile: frozenset[str] = frozenset()) -> list[str]:
    """The audit logs' content, without timestamps, chain hashes and the lines that record resumes
    (`also_volatile`: fields that may differ too, e.g. `fence` for a job retried under a new claim generation)."""
    clean_lines, final_lines = read_audit(clean_path), read_audit(final_path)
    problems = []
    clean_facts = {k: clean_lines[0].get(k) for k in JOB_FACTS}
    for line in final_lines:
        if line["event"] in ("job_started", "job_resumed"):
            facts = {k: line.get(k) for k in JOB_FACTS}
            if facts != clean_facts:
                problems.append(f"{AUDIT_FILE}: {line['event']} at {line['ts']} has other job facts: "
                                f"{sorted(k for k in JOB_FACTS if facts[k] != clean_facts[k])}")
        if line["event"] == "stage_invalidated" and line.get("reason") != "interrupted":
            problems.append(f"{AUDIT_FILE}: stage {line.get('stage')} invalidated because {line.get('reason')!r} (a kill changed a completed stage?)")
    clean_content, final_content = _content(clean_lines, also_volatile), _content(final_lines, also_volatile)
    for key, contents in final_content.items():
        if key not in clean_content:
            problems.append(f"{AUDIT_FILE}: {key} is not in the clean run: {json.dumps(contents[0], sort_keys=True)[:300]}")
            continue
        reference = clean_content[key][0]
        for content in contents:
            if content != reference:
                fields = sorted(k for k in set(content) | set(reference) if content.get(k) != reference.get(k))
                problems.append(f"{AUDIT_FILE}: {key} differs from the clean run in {fields}")
                break
    problems += [f"{AUDIT_FILE}: {key} missing" for key in clean_content if key not in final_content]
    if not problems and list(final_content) != list(clean_content):
        problems.append(f"{AUDIT_FILE}: events in another order than the clean run's")
    return problems


def _content(lines: list[dict[str, Any]], also_volatile: frozenset[str] = frozenset()) -> dict[tuple, list[dict[str, Any]]]:
    """{(event, stage, phase): [line without volatile fields, per occurrence]} in order of first appearance.

    The job_started/job_resumed facts are compared apart; job_finished's manifest_sha256
    follows the manifest (checked by verify-audit)."""
    content: dict[tuple, list[dict[str, Any]]] = {}
    for line in lines:
        if line["event"] in RESUME_EVENTS or line["event"] == "job_started":
            continue
        stripped = {k: v for k, v in line.items() if k not in VOLATILE_FIELDS | also_volatile}
        if line["event"] == "job_finished":
            stripped.pop("manifest_sha256", None)
        key: tuple = (line["event"], line.get("stage"), line.get("phase"))
        if line["event"] == "train_checkpoint":
            # A checkpoint holds numpy's and python's global RNG states, seeded by each process
            # from the OS: its files' hashes differ from process to process; its step does not.
            stripped.pop("files", None)
            key += (line.get("run"), line.get("step"))
        elif line["event"] == "scratch_written":
            key += (tuple(sorted(line.get("files") or {})),)  # one line per batch: compared with the same batch's
        content.setdefault(key, []).append(stripped)
    return content


def _json_difference(clean: Path, final: Path) -> str:
    """For a JSON file that differs: where it first differs (the first place to look)."""
    if clean.suffix != ".json":
        return ""
    try:
        a, b = json.loads(clean.read_text("utf-8")), json.loads(final.read_text("utf-8"))
    except ValueError:
        return ""
    where, value_a, value_b = _first_difference(a, b, "")
    return f" (first at {where or 'the top'}: clean {json.dumps(value_a)[:100]}, killed {json.dumps(value_b)[:100]})"


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{index}]")
    return where, a, b


# ---------------------------------------------------------------------------- helpers and main

def every_file(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, hidden and temporary ones included (engine.fsutil's
    hash_tree skips *.tmp: debris of an interrupted write is exactly what must not be missed)."""
    return {path.relative_to(root).as_posix(): sha256_file(path) for path in sorted(root.rglob("*")) if path.is_file()}


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def log_path(soak: Soak, round_number: int, number: int, stream: str) -> Path:
    return soak.workdir / "logs" / f"round-{round_number:02d}-run-{number:03d}.{stream}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text("utf-8", errors="replace").strip().splitlines()[-lines:])[-600:]
    except OSError:
        return "(no log)"


def summary(soak: Soak, wall_seconds: float) -> dict[str, Any]:
    landed = Counter(a.landed_in for a in soak.attempts if a.killed)
    # published: the job was already in the outbox (killed after the publishing rename, or a
    # re-run of a published job killed before it returned)
    segments = [STARTUP] + soak.stages + [FINISH, PUBLISHED]
    return {
        "ok": not soak.problems,
        "kills_wanted": soak.kills_wanted,
        "kills_landed": soak.kills_landed,
        "kills_missed": sum(1 for a in soak.attempts if a.target is not None and not a.killed),
        "kills_per_segment": {segment: landed.get(segment, 0) for segment in segments},
        "kills_aimed_per_segment": dict(Counter(a.target for a in soak.attempts if a.target is not None)),
        "resumes": sum(1 for a in soak.attempts if a.number > 1),
        "rounds": len(soak.rounds),
        "files_identical": sum(r.files_identical for r in soak.rounds),
        "files_total": sum(r.files_total for r in soak.rounds),
        "files_not_identical": dict(Counter(rel for r in soak.rounds for rel in r.not_identical)),
        "verify_audit_ok": sum(1 for r in soak.rounds if r.verify_audit == "OK"),
        "clean_run_seconds": round(soak.clean_seconds, 1),
        "clean_segment_seconds": {k: round(v, 3) for k, v in soak.segment_seconds.items()},
        "wall_seconds": round(wall_seconds, 1),
        "problems": soak.problems,
        "rounds_detail": [asdict(r) for r in soak.rounds],
        "attempts": [asdict(a) for a in soak.attempts],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50, help="kills that must land (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan (segments and delays)")
    parser.add_argument("--workdir", type=Path, default=None, help="working folder (default: a temporary one, removed unless --keep or a problem)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--config", type=Path, default=None, help="engine config.toml (default: built-in defaults, models inside the working folder)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one run may take before it counts as hung (default: 10x the clean run, at least 600)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))).resolve()
    soak = Soak(workdir=workdir, config=workdir / "config.toml", python=sys.executable, kills_wanted=args.kills,
                rng=random.Random(args.seed), timeout_s=args.timeout or 3600.0)
    print(f"crash soak: {args.kills} kills, seed {args.seed}, working folder {workdir}", flush=True)
    prepare_workdir(soak, args.config)
    clean_run(soak)
    if args.timeout is None:
        soak.timeout_s = max(600.0, 10 * soak.clean_seconds)
    print(f"clean run: {soak.clean_seconds:.1f} s; segments (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in soak.segment_seconds.items()), flush=True)
    soak_rounds(soak)
    wall = time.monotonic() - started
    result = summary(soak, wall)
    (workdir / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"kills landed:       {result['kills_landed']} of {result['kills_wanted']} wanted ({result['kills_missed']} missed: the run ended first)")
    print("kills per segment:  " + ", ".join(f"{k} {v}" for k, v in result["kills_per_segment"].items()))
    print(f"resumes:            {result['resumes']} (re-runs of the same command after a kill), over {result['rounds']} finished jobs")
    others = ", ".join(f"{rel} x{count}" for rel, count in sorted(result["files_not_identical"].items())) or "none"
    print(f"files identical:    {result['files_identical']} / {result['files_total']} byte for byte; not byte-identical: {others}")
    print("                    (audit.jsonl is compared by content, manifest.json without report.html's hash; report.html is a view of the audit log)")
    print(f"verify-audit:       {result['verify_audit_ok']} / {result['rounds']} OK")
    print(f"wall time:          {wall:.0f} s (clean run {soak.clean_seconds:.0f} s)")
    if soak.problems:
        print(f"\nFAILED: {len(soak.problems)} problems (working folder kept: {workdir})")
        for problem in soak.problems:
            print(f"  - {problem}")
        return 1
    print("\nOK: every finished job matches the clean run")
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
