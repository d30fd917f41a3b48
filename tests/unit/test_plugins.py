"""A lab's plug-in kinds (engine.plugins, config.toml `[kinds] plugins`): loaded where config.toml is
read, and a plug-in that cannot be loaded, or takes a kind's or a stage's name, is a refusal to
start naming the key and the module (both CLIs exit 2), with nothing of it registered."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from engine.cli import read_settings
from engine.errors import ConfigError
from engine.kinds import known_kinds, unregister_kind
from engine.stages import is_stage, stage_module

PLUGIN = "tests.harness.stamp_kind"


def _config(folder: Path, *plugins: str) -> Path:
    path = folder / "config.toml"
    listing = ", ".join(f'"{name}"' for name in plugins)
    path.write_text(f'[paths]\nmodels = "{folder / "models"}"\n\n[kinds]\nplugins = [{listing}]\n', encoding="utf-8")
    return path


@pytest.fixture()
def plugin_folder(tmp_path, monkeypatch):
    """A folder on sys.path for the plug-in modules a test writes; every kind they registered is
    removed afterwards (the registry is the process's)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(known_kinds())
    yield folder
    for name in set(known_kinds()) - before:
        unregister_kind(name)
    for name in [module for module in sys.modules if module.startswith("lab_")]:
        del sys.modules[name]


def _module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")
    return name


KIND_NAMED = """\
    from dataclasses import dataclass, field
    from engine.kinds.sections import KindSpec
    from engine.kinds import Kind
    from engine.schema import Str, rule

    @dataclass(frozen=True, kw_only=True)
    class Spec(KindSpec):
        kind: str = field(default={name!r}, metadata=rule(Str(min_len=1)))

    KINDS = (Kind(name={name!r}, stages=("prepare", {stage!r}), spec=Spec, stage_modules={{{stage!r}: {module!r}}}),)
"""


def test_the_plugin_of_the_config_registers_its_kind_and_its_stage(tmp_path, plugin_folder):
    settings = read_settings(_config(tmp_path, PLUGIN))
    assert settings.kinds.plugins == (PLUGIN,)
    assert "stamp" in known_kinds() and is_stage("stamp")
    assert stage_module("stamp").NAME == "stamp"
    read_settings(_config(tmp_path, PLUGIN))  # read again (the daemon, then its Engine): the same kind, no refusal
    assert settings.to_plain()["kinds"] == {"plugins": [PLUGIN]}
    assert "kinds" not in read_settings(None).to_plain()  # without plug-ins the audit's settings are as before [kinds]


@pytest.mark.parametrize("body, reason", [
    (None, "cannot be imported (ModuleNotFoundError: No module named 'lab_missing')"),
    ("import nonexistent_dependency\n", "cannot be imported (ModuleNotFoundError: No module named 'nonexistent_dependency')"),
    ("X = 1\n", "has no KINDS (a tuple of engine.kinds.Kind)"),
    (KIND_NAMED.format(name="replicate", stage="lab_stage", module="lab_x"), "a kind named 'replicate' is already registered"),
    (KIND_NAMED.format(name="lab_kind", stage="embed", module="lab_x"),
     "cannot be imported (ValueError: kind 'lab_kind' brings stage(s) embed, but engine/stages has stage(s) of that name)"),
], ids=["missing", "broken", "no-kinds", "kind-taken", "built-in-stage-taken"])
def test_a_plugin_that_cannot_be_loaded_is_a_refusal_naming_the_key_and_the_module(tmp_path, plugin_folder, body, reason):
    name = "lab_missing" if body is None else _module(plugin_folder, "lab_x", body)
    before = known_kinds()
    with pytest.raises(ConfigError) as refused:
        read_settings(_config(tmp_path, name))
    assert refused.value.code == "invalid_config"
    assert refused.value.message == f"kinds.plugins: the plug-in {name!r}: {reason}"
    assert known_kinds() == before


def test_a_stage_name_another_plugin_took_is_refused(tmp_path, plugin_folder):
    first = _module(plugin_folder, "lab_first", KIND_NAMED.format(name="lab_one", stage="lab_stage", module="lab_first"))
    second = _module(plugin_folder, "lab_second", KIND_NAMED.format(name="lab_two", stage="lab_stage", module="lab_second"))
    with pytest.raises(ConfigError) as refused:
        read_settings(_config(tmp_path, first, second))
    assert refused.value.message == "kinds.plugins: the plug-in 'lab_second': kind 'lab_two': a stage named 'lab_stage' already exists (lab_first)"
    assert "lab_one" in known_kinds() and "lab_two" not in known_kinds()


def test_a_plugin_name_that_is_no_module_name_is_refused_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"kinds\.plugins\[0\]: '\.\./evil' is not allowed: a dotted module name"):
        read_settings(_config(tmp_path, "../evil"))


def test_both_command_lines_exit_2_naming_the_key_and_the_module(tmp_path, plugin_folder, capsys):
    from daemon.__main__ import main as daemon_main
    from engine.__main__ import main as engine_main

    config = _config(tmp_path, "lab_missing")
    (tmp_path / "alice").mkdir()
    assert engine_main(["--config", str(config), "run", str(tmp_path / "alice"), "--outbox", str(tmp_path / "outbox")]) == 2
    assert "refused to start: invalid_config: kinds.plugins: the plug-in 'lab_missing': cannot be imported" in capsys.readouterr().err
    assert engine_main(["--config", str(config), "status"]) == 2
    assert "kinds.plugins: the plug-in 'lab_missing': " in capsys.readouterr().err
    # status on a given outbox still answers (read-only), saying which kinds it could not load
    assert engine_main(["--config", str(config), "status", "--outbox", str(tmp_path / "outbox")]) == 0
    answered = capsys.readouterr()
    assert "no plug-in kind is loaded: " in answered.err and "kinds.plugins: the plug-in 'lab_missing': " in answered.err
    assert "lab_missing" not in answered.out
    assert daemon_main(["--config", str(config), "--demo"]) == 2
    out = capsys.readouterr().out
    assert '"event": "refused_to_start"' in out and "kinds.plugins: the plug-in 'lab_missing': cannot be imported" in out


def test_the_inventory_lists_the_roles_the_stages_declare_a_plugin_stage_too(tmp_path, plugin_folder):
    """engine.inventory owns where each model is; which roles it lists is each stage's MODELS."""
    from engine.inventory import inventory, stages_through
    from engine.kinds import all_stage_names
    from engine.stages import declared_models

    body = textwrap.dedent(KIND_NAMED.format(name="lab_marks", stage="lab_marks_stage", module="lab_marks")) + textwrap.dedent("""\
        NAME = "lab_marks_stage"
        VERSION = 1
        OUTPUTS = ()
        MODELS = ("landmarks",)
    """)
    settings = read_settings(_config(tmp_path, _module(plugin_folder, "lab_marks", body)))
    (tmp_path / "models").mkdir()

    def listed(until):
        roles = {"faces" if entry.role == "faces_fallback" else entry.role for entry in inventory(settings, until=until)}
        return roles | {"base"}  # the base model is always listed (needed or not)

    for until in (None, *all_stage_names()):
        declared = {role for name in stages_through(until) for role in declared_models(name)}
        expected = (declared - {"inpaint"}) | {"base"}  # models.inpaint = "base": the base model's own weights
        assert listed(until) == expected, until
    assert "landmarks" in listed("lab_marks_stage") and "landmarks" not in listed("prepare")
