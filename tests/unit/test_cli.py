"""The two CLIs' shared set-up (engine.cli): which config.toml they read, and their JSON log lines."""

from __future__ import annotations

import io
import json

import structlog

from engine.cli import configure_json_logging, find_config


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
