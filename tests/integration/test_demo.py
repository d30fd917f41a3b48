"""scripts/demo, the README's first command, leaves inbox/ as it found it (issue 36: a daemon started
next on inbox/ claimed the example and ran it again). The script itself runs, in a copy of the
repository's layout (scripts/, engine/ and .venv linked, its own inbox/ and outbox/), stopped after
prepare (`--until prepare`, passed on to `engine run`): ~5 s instead of the whole chain's ~35 s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.jobfolder import INPUTS_DIR, work_dir
from tests.harness.jobs import folder_snapshot
from tests.harness.paths import REPO


def _venv_is_set_up_for_this_tree() -> bool:
    """scripts/demo runs scripts/setup first, which installs (from the index) unless .venv's stamp
    says it was set up from this very pyproject.toml and scripts/setup: a test must not install."""
    stamp = REPO / ".venv" / ".installed"
    if not stamp.is_file():
        return False
    listing = "".join(f"{hashlib.sha256((REPO / name).read_bytes()).hexdigest()}  {name}\n" for name in ("pyproject.toml", "scripts/setup"))
    return stamp.read_text().strip() == hashlib.sha256(listing.encode()).hexdigest()


@pytest.fixture()
def demo_tree(tmp_path: Path) -> Path:
    """The repository's layout for scripts/demo: its code linked, its folders its own."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("scripts", "engine", ".venv"):
        (root / name).symlink_to(REPO / name)
    for name in ("pyproject.toml", "config.toml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("inbox", "outbox", "models"):
        (root / name).mkdir()
        if (REPO / name / "README.md").is_file():
            shutil.copy2(REPO / name / "README.md", root / name / "README.md")
    return root


@pytest.fixture()
def demo_tree_with_models(demo_tree: Path, shared_models: Path) -> Path:
    """`demo_tree` on the session's models folder (the demo model is built there once, not by each
    test that runs the demo)."""
    shutil.rmtree(demo_tree / "models")
    (demo_tree / "models").symlink_to(shared_models)
    return demo_tree


def _run_demo(root: Path, *options: str) -> tuple[subprocess.CompletedProcess, Path]:
    """scripts/demo run in `root` with its own TMPDIR (where its temporary folder must not stay)."""
    temporary = root.parent / "tmp"
    temporary.mkdir(exist_ok=True)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run(["scripts/demo", *options], cwd=root, env=dict(env, TMPDIR=str(temporary)), capture_output=True, text=True, timeout=600)
    return done, temporary


def _drop_a_waiting_job(root: Path) -> dict[str, bytes]:
    """A lab's own job, dropped before the demo ran; what inbox/ holds then."""
    waiting = root / "inbox" / "bob"
    waiting.mkdir()
    (waiting / "job.toml").write_text('[[render]]\nprompt = "portrait"\n')
    return folder_snapshot(root / "inbox")


def _assert_as_it_was(root: Path, inbox_before: dict[str, bytes], temporary: Path) -> None:
    assert folder_snapshot(root / "inbox") == inbox_before  # nothing added, nothing taken
    assert sorted(p.name for p in (root / "inbox").iterdir()) == ["README.md", "bob"]
    assert list(temporary.glob("idrep-demo.*")) == []  # the example's temporary folder is gone (other libraries leave theirs)


needs_venv = pytest.mark.skipif(not _venv_is_set_up_for_this_tree(), reason="scripts/setup would install into .venv: run it (or scripts/test) first")


@needs_venv
def test_a_refused_demo_run_leaves_nothing_behind(demo_tree):
    """The cheap check (~1 s): the example is written, and `engine run` refuses at once (an unknown
    stage); the script stops there, and neither the inbox nor the temporary folder keeps anything."""
    inbox_before = _drop_a_waiting_job(demo_tree)
    done, temporary = _run_demo(demo_tree, "--until", "no-such-stage")
    assert done.returncode == 2 and "no-such-stage" in done.stderr, done.stderr[-4000:]
    assert "example subject written to " + str(temporary) in done.stdout
    _assert_as_it_was(demo_tree, inbox_before, temporary)
    assert list((demo_tree / "outbox").iterdir()) == [demo_tree / "outbox" / "README.md"]


@needs_venv
@pytest.mark.slow  # ~7 s on a loaded 2-core machine (engine start-up and prepare)
def test_demo_until_prepare_runs_the_example_from_a_temporary_folder(demo_tree_with_models):
    demo_tree = demo_tree_with_models
    inbox_before = _drop_a_waiting_job(demo_tree)
    done, temporary = _run_demo(demo_tree, "--until", "prepare")
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_as_it_was(demo_tree, inbox_before, temporary)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "partial" and result["subject"] == "astronaut"
    job = work_dir(demo_tree / "outbox", result["job_id"])
    assert Path(result["output"]) == job.resolve() and (job / "prepared" / "prepare.json").is_file()
    assert sorted(p.name for p in (job / INPUTS_DIR).iterdir()) == ["astronaut.png", "job.toml"]
    started = json.loads((job / "audit.jsonl").read_text().splitlines()[0])
    assert str(temporary) in json.dumps(started) and "inbox" not in json.dumps(started)  # where the example was run from


@needs_venv
@pytest.mark.slow  # the whole chain: ~35 s on a 2-core CPU
def test_the_whole_demo_publishes_into_the_outbox_and_leaves_the_inbox_as_it_was(demo_tree_with_models):
    demo_tree = demo_tree_with_models
    inbox_before = _drop_a_waiting_job(demo_tree)
    done, temporary = _run_demo(demo_tree)
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_as_it_was(demo_tree, inbox_before, temporary)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["outcome"] == "finished"
    published = demo_tree / "outbox" / "astronaut" / result["job_id"]  # where the README says it is
    assert Path(result["output"]) == published.resolve() and (published / "report.html").is_file()
    assert any(line.startswith("OK: ") and "audit lines chained" in line for line in done.stdout.splitlines()), done.stdout  # verify-audit passed it
