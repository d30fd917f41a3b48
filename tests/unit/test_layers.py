"""The layers stay apart.

- engine/ imports nothing of daemon/; daemon/ imports only the `engine` package's public names
  and the few engine modules that are vocabulary shared on purpose.
- engine/ is in rooms, lowest first (ROOMS): a module imports its own room and the rooms below it,
  never one above. Imports inside functions count (they run); imports under `if TYPE_CHECKING:`
  do not (they name types for annotations and never run).
- No import cycle among the modules of engine/ or of daemon/.

The checks run on the source's syntax trees (nothing is imported), and on a planted tree first,
so that a checker that stopped finding anything would fail here too."""

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

# The engine's rooms, lowest first. A name is a module or a package (with everything in it), or
# "=name": that module alone (engine/stages/__init__.py is the stage registry, plain data the
# kinds check their stages against, below the stages it names); the longest match places a module.
ROOMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base: errors, files on disk, the config language, hashes, photos, file names, lifecycle words",
     ("engine.errors", "engine.faults", "engine.fsutil", "engine.schema", "engine.version", "engine.hashcache",
      "engine.images", "engine.layout", "engine.lifecycle")),
    ("measure: the statistics and measures, on plain numbers and arrays", ("engine.measure",)),
    ("diffusion: model files, loading, sampling, training, compiling, LoRA formats", ("engine.diffusion",)),
    ("identity: faces, FaceID, the second model, landmarks, regions, background", ("engine.identity",)),
    ("provenance: audit log, chains, trust, signing, credentials, verification", ("engine.provenance",)),
    ("job: settings, the job spec and its kinds, the job folder, ledger, stage context, resources",
     ("engine.config", "engine.job", "engine.kinds", "engine.jobfolder", "engine.ledger", "engine.context",
      "engine.resources", "engine.plugins", "=engine.stages")),
    ("stages: one module per stage", ("engine.stages",)),
    ("report: the page and each kind's sections", ("engine.report",)),
    ("runner: running a job, reading a queue's state, the model inventory, the example",
     ("engine.runner", "engine.status", "engine.inventory", "engine.example")),
    ("entry points: the CLIs and the public names", ("engine.cli", "engine.__main__", "engine")),
)


def _modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return skipped


def _imports(path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """Absolute imports that run (at module level or in a function). `from a import b` counts as
    importing a.b when a.b is a module of `known`, else as importing a."""
    tree = ast.parse(path.read_text("utf-8"))
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known or ())
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = _modules(root, package)
    return {name: {other for other in _imports(path, modules) if other in modules and other != name} for name, path in modules.items()}


def _room(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(ROOMS):
        for name in names:
            exact = name.startswith("=")
            name = name.lstrip("=")
            if (module == name or (not exact and module.startswith(name + "."))) and (best is None or len(name) + exact > best[1]):
                best = (index, len(name) + exact)
    return None if best is None else best[0]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            if _room(other) > _room(module):
                found.append(f"{module} ({ROOMS[_room(module)][0].split(':')[0]}) imports {other} ({ROOMS[_room(other)][0].split(':')[0]})")
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    cycles.append(sorted(component))
    return cycles


def test_the_checks_find_a_planted_cycle_and_a_planted_upward_import(tmp_path):
    (tmp_path / "engine" / "identity").mkdir(parents=True)
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "identity" / "__init__.py").write_text("")
    (tmp_path / "engine" / "fsutil.py").write_text("def helper():\n    from engine.identity import faces\n")
    (tmp_path / "engine" / "identity" / "faces.py").write_text(
        "from typing import TYPE_CHECKING\nfrom engine.fsutil import helper\nif TYPE_CHECKING:\n    from engine.runner import Engine\n")
    (tmp_path / "engine" / "runner.py").write_text("")
    graph = _graph(tmp_path, "engine")
    assert graph["engine.identity.faces"] == {"engine.fsutil"}, "an import under TYPE_CHECKING never runs"
    assert _cycles(graph) == [["engine.fsutil", "engine.identity.faces"]]
    assert _upward(graph) == ["engine.fsutil (base) imports engine.identity.faces (identity)"]


def test_every_engine_module_is_in_a_room():
    assert [name for name in _modules(REPO, "engine") if _room(name) is None] == []


def test_no_engine_module_imports_a_room_above_its_own():
    assert _upward(_graph(REPO, "engine")) == []


def test_no_import_cycle_in_the_engine_or_the_daemon():
    assert _cycles(_graph(REPO, "engine")) == []
    assert _cycles(_graph(REPO, "daemon")) == []


def test_the_daemon_imports_only_the_engines_public_names_and_its_shared_vocabulary():
    for path in sorted((REPO / "daemon").glob("*.py")):
        reached = {name for name in _imports(path) if name == "engine" or name.startswith("engine.")}
        assert reached <= set(DAEMON_MAY_IMPORT), f"{path.name} imports {sorted(reached - set(DAEMON_MAY_IMPORT))}"


def test_the_engine_knows_nothing_of_the_daemon():
    for path in sorted((REPO / "engine").rglob("*.py")):
        assert not {name for name in _imports(path) if name == "daemon" or name.startswith("daemon.")}, path
