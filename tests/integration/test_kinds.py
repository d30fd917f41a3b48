"""Job kinds (engine.kinds): a kind is data, and the runner, ledger, resume, audit log, outbox,
report and status serve any kind without an edit. Proved with a kind made here, in the test:
`faces_only`, two existing stages (prepare + embed), run end to end and killed half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.jobfolder import work_dir
from engine.kinds.sections import KindSpec
from engine.kinds import Kind, kind_named, register_kind, unregister_kind
from engine.status import format_status, outbox_status
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_JOB, make_job
from tests.harness.paths import REPO

KIND = "faces_only"
JOB_TOML = f'kind = "{KIND}"\n\n[prepare]\nsize = 128\nrotations = [-10]\ncrops = []\n'
JOB_ID = "20260101T000000Z-kind01"


@dataclass(frozen=True, kw_only=True)
class FacesOnlySpec(KindSpec):
    """Nothing but the sections every kind has."""


FACES_ONLY = Kind(name=KIND, stages=("prepare", "embed"), spec=FacesOnlySpec, report=("timeline", "settings", "audit"),
                  title="Faces-only report", summary="a test's kind: the prepared crops and their embeddings")


def register() -> None:
    """Also called by the engine subprocess below (the kind exists only where it is registered)."""
    register_kind(FACES_ONLY)


@pytest.fixture()
def faces_only():
    register()
    yield FACES_ONLY
    unregister_kind(KIND)


def _run_cli_until_paused(config: Path, source: Path, outbox: Path, point: str, marker: Path) -> subprocess.Popen:
    """`python -m engine run` in a process that registers the test's kind first, paused at `point`."""
    code = ("import sys; from tests.integration.test_kinds import register; register(); "
            "from engine.__main__ import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_PAUSE_AT=point, ENGINE_PAUSE_FILE=str(marker))
    process = subprocess.Popen([sys.executable, "-c", code, "--config", str(config), "run", str(source), "--outbox", str(outbox), "--demo",
                                "--job-id", JOB_ID], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"engine ended before reaching {point}: {process.communicate()}")
        assert time.monotonic() < deadline, f"engine never reached {point}"
        time.sleep(0.05)
    return process


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


def test_a_kind_made_in_a_test_runs_end_to_end_resumes_after_a_kill_and_is_published_reported_and_shown(
        tmp_path, settings, faces_only, astronaut_rgb):
    source = make_job(tmp_path / "inbox" / "alice", {"a.png": astronaut_rgb}, JOB_TOML)
    outbox = tmp_path / "outbox"
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{settings.models_dir}"\n')

    # Killed after embed wrote its files, before the ledger committed it.
    process = _run_cli_until_paused(config, source, outbox, "stage:embed:written", tmp_path / "paused")
    try:
        job_dir = work_dir(outbox, JOB_ID)
        ledger = json.loads((job_dir / "state.json").read_text())
        assert ledger["kind"] == KIND and [(s["name"], s["status"]) for s in ledger["stages"]] == [("prepare", "complete"), ("embed", "running")]
        status = outbox_status(outbox)
        [running] = status.running
        assert (running.kind, running.stage, running.stages_total) == (KIND, "embed", 2)
        assert f"alice  {JOB_ID}  faces_only  running  stage embed (2/2)" in format_status(status)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.communicate()

    # Resumed in this process: prepare is skipped, embed (interrupted) is re-done.
    from engine.runner import Engine

    result = Engine(settings, demo=True).run_job(source, outbox)
    assert result.outcome == "finished" and result.job_id == JOB_ID, result.error
    out = result.output_dir
    assert out == outbox / "alice" / JOB_ID
    events = _events(out)
    assert events[0]["event"] == "job_started" and events[0]["kind"] == KIND
    assert [e["stage"] for e in events if e["event"] == "stage_skipped"] == ["prepare"]
    assert [(e["stage"], e["reason"]) for e in events if e["event"] == "stage_invalidated"] == [("embed", "interrupted")]
    assert [e["stage"] for e in events if e["event"] == "stage_finished"] == ["prepare", "embed"]

    # The outbox: the kind's stages' outputs and the records every job has, nothing of another kind.
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["audit.jsonl", "embedding/embed.json", "embedding/embeddings.npy", "embedding/reference.npy", "inputs/a.png",
                     "inputs/job.toml", "manifest.json", "prepared/0-a_base.png", "prepared/0-a_rot-10.png", "prepared/prepare.json",
                     "report.html", "report/original_0.png", "signature.json", "state.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == KIND and set(manifest["inputs"]) == {"a.png", "job.toml"}
    assert not any(name.startswith("base/") for name in manifest["models"])  # no stage of this kind used the diffusion model
    report = verify_audit(out)
    assert report.ok, report.problems

    # The report: the kind's title and sections, no chart of a section it does not show.
    page = (out / "report.html").read_text()
    assert "<h1>Faces-only report: alice</h1>" in page
    assert 'id="timeline"' in page and 'id="seeds"' not in page and 'id="training"' not in page and 'id="summary"' not in page

    # Status: the finished job among the results.
    [finished] = outbox_status(outbox).results
    assert (finished.job_id, finished.outcome, finished.kind) == (JOB_ID, "finished", KIND)
    assert f"alice  {JOB_ID}  faces_only  FINISHED" in format_status(outbox_status(outbox))


def test_the_same_folder_under_another_kind_drops_what_the_other_kind_made(tmp_path, engine, faces_only, astronaut_rgb):
    """A person changes job.toml's kind and runs the folder again: nothing the first kind made
    is published with the second."""
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB)
    outbox = tmp_path / "outbox"
    first = engine.run_job(source, outbox, until="train")
    assert first.outcome == "partial", first.error
    assert (work_dir(outbox, first.job_id) / "lora").is_dir()
    (source / "job.toml").write_text(JOB_TOML)
    result = engine.run_job(source, outbox)
    assert (result.outcome, result.job_id) == ("finished", first.job_id), result.error
    assert not (result.output_dir / "lora").exists() and not (result.output_dir / "train").exists()
    [dropped] = [e for e in _events(result.output_dir) if e["event"] == "stages_dropped"]
    assert dropped["stages"] == ["train"]
    assert verify_audit(result.output_dir).ok


def test_until_names_a_stage_of_the_jobs_kind(tmp_path, engine, faces_only, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, JOB_TOML)
    with pytest.raises(ConfigError, match="a faces_only job has no such stage; its stages are prepare, embed"):
        engine.run_job(source, tmp_path / "outbox", until="train")
    assert engine.run_job(source, tmp_path / "outbox", until="embed").outcome == "finished"


def test_a_kind_is_checked_when_it_is_made_and_registered():
    with pytest.raises(TypeError, match="lacks kind, prepare, subject"):
        Kind(name="broken", stages=("prepare",), spec=Kind)
    with pytest.raises(ValueError, match="unknown stage"):
        Kind(name="broken", stages=("prepare", "paint"), spec=FacesOnlySpec)
    with pytest.raises(ValueError, match="already registered"):
        register_kind(Kind(name="replicate", stages=("prepare",), spec=FacesOnlySpec))
    with pytest.raises(KeyError, match="known kinds: evaluate, replicate"):
        kind_named("broken")


def test_a_stage_takes_only_the_models_it_declares_and_each_is_fingerprinted_and_recorded(tmp_path, settings, astronaut_rgb):
    """One declaration per stage (engine.stages: models(ctx)): the runner fingerprints each
    declared role's files, `use` records what was used, and a model the stage did not declare
    cannot be used (it would change results its fingerprint does not cover)."""
    from engine.context import StageContext
    from engine.resources import Resources
    from engine.resources import MODEL_ROLES
    from engine.stages import STAGE_MODULES, declared_models, stage_module

    resources = Resources(settings, demo=True)
    ctx = StageContext(job=None, job_id="j", job_dir=tmp_path, settings=settings, resources=resources, audit=None, demo=True,
                       models_declared=("faces",))
    assert ctx.use("faces") is resources.faces() and ctx.models_used == resources.hashes("faces")
    with pytest.raises(RuntimeError, match="uses the 'base' model but declares only faces"):
        ctx.use("base")
    assert set(ctx.models_used) == set(resources.hashes("faces"))
    for name in STAGE_MODULES:  # every stage declares its models, and names only roles resources knows
        module = stage_module(name)
        assert callable(module.models) and set(module.MODELS) <= set(MODEL_ROLES), name
        assert declared_models(name) == module.MODELS, name  # what the inventory reads from the source is what the module has
