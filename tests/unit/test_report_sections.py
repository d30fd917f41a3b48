"""The report's pieces meet by name: each kind's `report` names sections the report package
defines, the shared page imports no kind's module, the verify groups' presentation follows
engine.kinds.sections' group names, and each name of a file in a job folder has one definition
(engine.layout)."""

from __future__ import annotations

import ast

import pytest

from engine import layout
from engine.kinds.sections import CONTROL_GROUP, IDENTITY_METHODS
from engine.kinds import all_kinds
from engine.report import SECTIONS, Section, add_sections
from engine.report import replicate as replicate_report
from tests.conftest import REPO


def test_every_kind_shows_sections_the_report_defines_and_every_section_is_shown_by_a_kind():
    shown = {name for kind in all_kinds() for name in kind.report}
    assert shown <= set(SECTIONS), f"kinds name undefined sections: {sorted(shown - set(SECTIONS))}"
    assert set(SECTIONS) <= shown, f"sections no kind shows: {sorted(set(SECTIONS) - shown)}"


def test_a_section_name_is_defined_once():
    with pytest.raises(ValueError, match="timeline"):
        add_sections({"timeline": Section(lambda facts, job_src: [])})
    add_sections({"timeline": SECTIONS["timeline"]})  # the same section again changes nothing


def test_the_shared_page_imports_no_kind_module():
    tree = ast.parse((REPO / "engine" / "report" / "page.py").read_text("utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("engine.report")}


def test_the_verify_group_tables_are_keyed_by_the_shared_sections_group_names():
    from engine.stages.verify import FILE_PREFIX

    groups = {*IDENTITY_METHODS, CONTROL_GROUP}
    for table in (replicate_report.VERIFY_GROUP_COLOURS, replicate_report.VERIFY_GROUP_TITLES, replicate_report.VERIFY_GROUP_HEADINGS, FILE_PREFIX):
        assert set(table) == groups
    assert set(replicate_report.GROUPS_BEFORE_IDENTITY) <= groups
    with pytest.raises(ValueError, match=r"engine\.kinds\.sections. groups are"):
        replicate_report._by_verify_group({"lora": "tab:blue", CONTROL_GROUP: "tab:gray"})


def test_each_file_name_of_a_job_folder_is_written_once_in_engine_layout():
    """A literal equal to one of layout's file names (those with a "." or "/": bare words such as
    "train" are also stage names) anywhere else in engine/ or daemon/ is a second definition."""
    names = {value for key, value in vars(layout).items() if key.isupper() and isinstance(value, str) and ("." in value or "/" in value)}
    names |= {value for key, table in vars(layout).items() if key.isupper() and isinstance(table, dict) for value in table.values()}
    assert {layout.AUDIT_FILE, layout.MANIFEST_FILE, layout.REPORT_FILE, layout.DRIFT_CHART, layout.RETOUCH_OVERLAY} <= names
    elsewhere = []
    for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "daemon").rglob("*.py")]):
        if path == REPO / "engine" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                elsewhere.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not elsewhere, elsewhere
