"""The README stands alone on a fresh clone: its first commands are the two the guide promises
(set up and run the demo; run the tests), its quick start fits on a screen, every page it links to
exists, and CI runs exactly its test command."""

from __future__ import annotations

import re

from tests.harness.paths import REPO

README = (REPO / "README.md").read_text("utf-8")


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_first_commands_are_the_demo_and_the_tests():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    assert (REPO / "scripts" / "demo").stat().st_mode & 0o111 and (REPO / "scripts" / "test").stat().st_mode & 0o111


def test_the_quick_start_fits_on_a_screen():
    assert len(_section("Quick start").strip().splitlines()) <= 40


def test_every_page_the_readme_and_the_docs_link_to_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text("utf-8")):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"
    assert {p.name for p in (REPO / "docs").glob("*.md")} <= set(re.findall(r"docs/([a-z]+\.md)", README)), "a page of docs/ the README does not name"


def test_ci_runs_exactly_the_readmes_test_command():
    ci = (REPO / ".ci" / "run").read_text("utf-8")
    assert re.search(r"^\./scripts/test$", ci, re.M)
