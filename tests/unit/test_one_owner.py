"""One owner for each fact (issue 32): the facts that had several copies each have one definition
in engine/ and daemon/ — the string written once (docstrings aside), the constant assigned once,
the retired copies gone. Other modules name the owner's constant, never the value."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.harness.paths import REPO

SOURCES = sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "daemon").rglob("*.py")])


def _strings(path: Path) -> list[tuple[str, int]]:
    """Every string constant of a module but its docstrings, with its line."""
    tree = ast.parse(path.read_text("utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _written(value: str) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line}" for path in SOURCES for text, line in _strings(path) if text == value]


def _assigned(name: str) -> list[str]:
    pattern = re.compile(rf"^\s*{name}\s*(?::[^=]+)?=", re.M)
    return [str(path.relative_to(REPO)) for path in SOURCES if pattern.search(path.read_text("utf-8"))]


def test_the_job_file_the_default_kind_and_the_publishing_names_are_written_once():
    for name in ("job.toml", "replicate", ".work", ".incoming"):
        assert len(_written(name)) == 1, (name, _written(name))


def test_the_retouch_regions_are_named_in_engine_identity_regions_only():
    for region in ("forehead", "under_eye", "smile_lines", "chin"):
        assert {place.split(":")[0] for place in _written(region)} == {"engine/identity/regions.py"}, region


def test_the_seed_groups_are_owned_by_the_shared_sections():
    owner = "engine/kinds/sections.py"
    assert [place.split(":")[0] for place in _written("control")].count(owner) == 1
    assert not [place for place in _written("control") if place.startswith("daemon/")]
    for name in ("IDENTITY_METHODS", "CONTROL_GROUP", "MAX_PHOTOS", "DEFAULT_KIND", "JOB_FILE", "DEMO_RESOLUTION", "REGIONS"):
        assert len(_assigned(name)) == 1, (name, _assigned(name))


def test_the_retired_copies_are_gone():
    text = "\n".join(path.read_text("utf-8") for path in SOURCES)
    for retired in ("class RetouchAccept", "class MineSpec", "def rule_of(", "RETOUCH_REGIONS", "LONG_STAGES ="):
        assert retired not in text, retired
    # the model's side in a demo run is asked of the stage context, never worked out again
    assert len(re.findall(r"DEMO_RESOLUTION if", text)) == 1


def test_the_checks_here_see_a_planted_copy(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""A docstring naming job.toml is not a copy."""\nJOB_FILE = "job.toml"\nx = {"job.toml": 1}\n')
    assert [text for text, _ in _strings(planted) if text == "job.toml"] == ["job.toml", "job.toml"]
