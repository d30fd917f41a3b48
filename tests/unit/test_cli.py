"""The two CLIs' shared set-up (engine.cli): which config.toml they read, the folders it names,
the options they take before or after a command, their JSON log lines, and how they end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from daemon.__main__ import main as daemon_main
from engine.__main__ import main as engine_main
from engine.cli import BROKEN_PIPE_EXIT, configure_json_logging, find_config
from tests.harness.paths import REPO


def test_the_config_given_else_the_one_in_the_current_folder_else_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(None) is None  # the built-in defaults
    (tmp_path / "config.toml").write_text("")
    assert str(find_config(None)) == "config.toml"
    assert find_config(tmp_path / "lab.toml") == tmp_path / "lab.toml"  # given: used as it is, even when missing (Settings.load says so)


def test_json_lines_with_the_extra_processor_and_the_level_filter():
    stream = io.StringIO()

    def tag(_logger, _method, event):
        event.setdefault("daemon_id", "gpu0")
        return event

    configure_json_logging("info", stream, extra=tag)
    log = structlog.get_logger("anything")
    log.debug("not_shown")
    log.info("shown", n=1)
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["event"], line["n"], line["daemon_id"], line["level"]) == ("shown", 1, "gpu0", "info") and line["timestamp"].endswith("Z")


# ---- the papercuts of a first run: folders from config.toml, --config anywhere, a closed pipe, a refusal shown once ----


def test_a_refusal_at_start_is_shown_once_by_the_engine(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[faces]\ndetect_size = 5\n")
    assert engine_main(["--config", str(bad), "run", str(tmp_path), "--outbox", str(tmp_path / "outbox")]) == 2
    out, err = capsys.readouterr()
    assert (out + err).count("must be at least 128, got 5") == 1, out + err
    assert err.startswith("refused to start: invalid_config: ")


def test_the_daemon_without_a_command_still_runs_and_refuses_once_with_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[faces]\ndetect_size = 5\n")
    assert daemon_main(["--config", str(bad), "--daemon-id", "gpu9"]) == 2
    out, err = capsys.readouterr()
    assert (out + err).count("must be at least 128, got 5") == 1, out + err
    [line] = [json.loads(text) for text in out.splitlines()]
    assert (line["event"], line["code"], line["daemon_id"]) == ("refused_to_start", "invalid_config", "gpu9") and err == ""


def test_a_refusal_by_the_daemons_service_is_logged_and_not_printed_as_well(tmp_path):
    config = tmp_path / "nested.toml"  # the outbox inside the inbox: refused when the service prepares its folders
    config.write_text('[daemon]\ninbox = "in"\noutbox = "in/out"\nmetrics_port = 0\n')
    done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("is inside the inbox") == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["event"] == "refused_to_start"


def _lab(root: Path) -> Path:
    """A lab whose config.toml names its folders away from the current folder, with one failed
    job and one folder waiting in its inbox; returns the config's path."""
    lab = root / "lab"
    (lab / "shared" / "in" / "alice").mkdir(parents=True)
    (lab / "shared" / "in" / "alice" / "job.toml").write_text("")
    (lab / "shared" / "out").mkdir()
    failed = lab / "shared" / "failed" / "carol" / "J0"  # failed/ beside the outbox: [daemon] failed = ""
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"code": "no_face_found", "message": "no face in a.jpg", "failed_at": "2026-11-25T10:00:00+00:00"}))
    config = lab / "lab.toml"
    config.write_text('[daemon]\ninbox = "shared/in"\noutbox = "shared/out"\n')
    return config


def _elsewhere(root: Path, monkeypatch) -> None:
    """Run from a folder whose own ./config.toml names other folders: a flag that fell back to
    it (or to the current folder) would show."""
    here = root / "elsewhere"
    here.mkdir()
    (here / "config.toml").write_text('[daemon]\ninbox = "wrong-in"\noutbox = "wrong-out"\n')
    monkeypatch.chdir(here)


def test_engine_commands_take_the_folders_config_toml_names_when_none_is_given(tmp_path, monkeypatch, capsys):
    config = _lab(tmp_path)
    _elsewhere(tmp_path, monkeypatch)
    shared = config.parent / "shared"
    assert engine_main(["--config", str(config), "status", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (plain["outbox"], plain["inbox"]) == (str(shared / "out"), str(shared / "in"))
    assert plain["queue"] == ["alice"] and [r["job_id"] for r in plain["results"]] == ["J0"]
    # verify-journal: the configured outbox (a job folder in it that no journal line names)
    (shared / "out" / "bob" / "J9").mkdir(parents=True)
    assert engine_main(["--config", str(config), "verify-journal"]) == 1
    assert f"FAILED: {shared / 'out'}" in capsys.readouterr().err
    # run: the configured outbox, probed before any model is loaded (here a file, not a folder)
    (config.parent / "lab.toml").write_text('[daemon]\noutbox = "not-a-folder"\n')
    (config.parent / "not-a-folder").write_text("")
    assert engine_main(["--config", str(config), "run", str(shared / "in" / "alice")]) == 2
    assert f"{config.parent / 'not-a-folder'}" in capsys.readouterr().err


def test_config_and_log_level_mean_the_same_before_and_after_the_command(tmp_path, monkeypatch, capsys):
    config = _lab(tmp_path)
    _elsewhere(tmp_path, monkeypatch)
    outputs = {}
    for cli, argv in (("engine", ["status", "--json"]), ("daemon", ["status", "--json"])):
        main = engine_main if cli == "engine" else daemon_main
        for where, args in (("before", ["--config", str(config), "--log-level", "warning", *argv]),
                            ("after", [*argv, "--config", str(config), "--log-level", "warning"]),
                            ("split", ["--config", str(config), argv[0], "--log-level", "warning", *argv[1:]])):
            assert main(args) == 0, (cli, where)
            outputs[cli, where] = json.loads(capsys.readouterr().out)
        assert outputs[cli, "before"] == outputs[cli, "after"] == outputs[cli, "split"], cli
    assert outputs["engine", "after"]["outbox"] == str(config.parent / "shared" / "out")  # not ./config.toml's
    assert outputs["daemon", "after"]["inbox"] == str(config.parent / "shared" / "in")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    from tests.harness.jobs import fake_finished_job

    job = fake_finished_job(tmp_path / "job")
    config = _lab(tmp_path)
    for command in (["engine", "verify-audit", str(job)], ["daemon", "status", "--config", str(config)]):
        # `... | head -1` once head has its line: the read end is closed before the command writes.
        process = subprocess.Popen([sys.executable, "-m", *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
        process.stdout.close()
        err = process.stderr.read()
        assert process.wait(60) == BROKEN_PIPE_EXIT and "Traceback" not in err, (command, err)
