"""The layers stay apart: engine/ imports nothing of daemon/, and daemon/ imports only the
`engine` package's public names and the few engine modules that are vocabulary shared on
purpose, never the runner, the stages, the audit log or the file helpers behind them."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness.paths import REPO

# What daemon/ may import from the engine, and why.
DAEMON_MAY_IMPORT = {
    "engine": "the public names (Engine, Settings, JobError, ConfigError, OwnershipLost, ...)",
    "engine.jobfolder": "the job-folder vocabulary: names, look-ups, the failure publisher, disk discipline",
    "engine.schema": "the config language [daemon] is validated in, like every table of config.toml",
    "engine.status": "read-only views of job folders (daemon status) and stage progress (metrics)",
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_daemon_imports_only_the_engines_public_names_and_its_shared_vocabulary():
    for path in sorted((REPO / "daemon").glob("*.py")):
        reached = {name for name in _imports(path) if name == "engine" or name.startswith("engine.")}
        assert reached <= set(DAEMON_MAY_IMPORT), f"{path.name} imports {sorted(reached - set(DAEMON_MAY_IMPORT))}"


def test_the_engine_knows_nothing_of_the_daemon():
    for path in sorted((REPO / "engine").rglob("*.py")):
        assert not {name for name in _imports(path) if name == "daemon" or name.startswith("daemon.")}, path


# The provenance modules: writers (the audit chain, signed heads and journal, Content Credentials,
# the signer) and the verifier that reads what they wrote (engine.provenance.verification).
PROVENANCE = ("engine.provenance.audit", "engine.provenance.chain", "engine.provenance.credentials", "engine.provenance.signer", "engine.provenance.trust", "engine.provenance.verification")


def _every_import(path: Path) -> set[str]:
    """What a module imports anywhere (at the top and inside functions), each name of a `from`
    import counted as the module it may be."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_provenance_writers_and_their_verifier_import_one_another_without_a_cycle():
    graph = {name: _every_import(REPO / (name.replace(".", "/") + ".py")) & set(PROVENANCE) - {name} for name in PROVENANCE}
    assert "engine.provenance.audit" in graph["engine.provenance.verification"] and "engine.provenance.trust" in graph["engine.provenance.verification"]  # the check sees imports
    done: set[str] = set()

    def walk(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join(path + (name,))
        if name not in done:
            for imported in sorted(graph[name]):
                walk(imported, path + (name,))
            done.add(name)

    for name in PROVENANCE:
        walk(name, ())
    assert not any("engine.provenance.verification" in imported for name, imported in graph.items() if name != "engine.provenance.verification")


def test_the_kinds_import_no_loader_and_the_loader_names_no_kind():
    """engine.job (the generic loader) imports the kinds' package; a kind's module, the shared
    sections and the registry never import engine.job (it was a cycle), a stage or the report,
    and engine.job imports no kind's module. Imports inside functions count."""
    kinds = sorted((REPO / "engine" / "kinds").glob("*.py"))
    assert {path.stem for path in kinds} >= {"__init__", "registry", "sections", "replicate", "retouch", "restore", "evaluate"}
    for path in kinds:
        reached = {name for name in _imports(path) if name.startswith("engine.")}
        assert not {name for name in reached if name in ("engine.job", "engine.runner", "engine.report") or name.startswith("engine.stages.")}, path.name
        if path.stem in ("registry", "sections"):
            assert not {name for name in reached if name.startswith("engine.kinds.") and name not in ("engine.kinds.registry", "engine.kinds.sections")}, path.name
    loader = _imports(REPO / "engine" / "job.py")
    assert "engine.kinds" in loader and not {name for name in loader if name.startswith("engine.kinds.") and name != "engine.kinds.sections"}
