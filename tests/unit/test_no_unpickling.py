"""Nothing the share can hold is ever unpickled (issue 30, "the share is hostile"): no
`torch.load`, `pickle.load(s)`, `np.load(..., allow_pickle=True)`, joblib, dill or
`weights_only=False` in engine/ or daemon/, except the few calls that read only the lab's staged
model folder, each allowed by name (file, function) with its reason. Checked on the syntax tree
(import aliases resolved, keyword arguments read), not by grep: a new call anywhere else fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness.paths import REPO

SCANNED = ("engine", "daemon")

# Dotted names (after import aliases) that unpickle whatever bytes they are given.
UNPICKLERS = frozenset({"torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load",
                        "_pickle.loads", "joblib.load", "numpy.load"})
# Methods that unpickle some of the files they may be pointed at, whatever their object is called.
UNPICKLING_METHODS = frozenset({"from_single_file"})  # diffusers: a .ckpt is a pickle (read with torch.load weights_only=True)
UNPICKLING_MODULES = frozenset({"dill", "cloudpickle"})

# (file, function, name) -> why that call reads nothing the share can hold.
ALLOWED = {
    ("engine/identity/faceid.py", "convert_bin", "torch.load"):
        "`python -m engine models convert-faceid` converts the lab's published FaceID .bin once, at staging, with weights_only=True; "
        "jobs read the .safetensors it writes",
    ("engine/diffusion/models.py", "load_pipeline", "from_single_file"):
        "the base model named by models.base in the lab's own models folder (a .ckpt is read by diffusers with weights_only=True), "
        "never a file of a job folder",
}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`a.b.c` with its root resolved through the module's imports (np.load -> numpy.load)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword_true_or_unknown(call: ast.Call, name: str) -> bool:
    """The call passes `name` as anything but a literal False (or **kwargs that may hold it)."""
    for keyword in call.keywords:
        if keyword.arg is None:
            return True
        if keyword.arg == name:
            return not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
    return False


class _Finder(ast.NodeVisitor):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.functions: list[str] = []
        self.found: list[tuple[str, str, int]] = []  # (function, name, line)

    def _add(self, name: str, node: ast.AST) -> None:
        self.found.append((".".join(self.functions) or "<module>", name, node.lineno))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in UNPICKLING_MODULES:
                self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            self._add(node.module or "", node)

    def visit_Call(self, node: ast.Call) -> None:
        for keyword in node.keywords:
            if keyword.arg == "weights_only" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True):
                self._add("weights_only=False", node)
        name = _dotted(node.func, self.aliases)
        if name == "numpy.load":
            if _keyword_true_or_unknown(node, "allow_pickle"):
                self._add("numpy.load(allow_pickle=True)", node)
        elif name in UNPICKLERS:
            self._add(name, node)
        elif isinstance(node.func, ast.Attribute) and node.func.attr in UNPICKLING_METHODS:
            self._add(node.func.attr, node)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = _dotted(node, self.aliases)
        if name is not None and name != "numpy.load" and name in UNPICKLERS and not isinstance(getattr(node, "_called", None), ast.Call):
            self._add(name, node)  # taken without a call (loader = torch.load): a call is bound to follow
        self.generic_visit(node)


def unpickling_calls(source: str) -> list[tuple[str, str, int]]:
    """(function, what, line) for every place `source` unpickles or may unpickle."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):  # a called attribute is checked as a call (with its keywords), not twice
        if isinstance(node, ast.Call):
            node.func._called = node  # type: ignore[attr-defined]
    finder = _Finder(aliases)
    finder.visit(tree)
    return sorted(set(finder.found), key=lambda found: found[2])


def _sources() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (REPO / folder).rglob("*.py"))


def test_nothing_in_engine_or_daemon_unpickles_except_the_allowed_staging_reads():
    found = []
    used = set()
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for function, name, line in unpickling_calls(path.read_text("utf-8")):
            if (rel, function, name) in ALLOWED:
                used.add((rel, function, name))
            else:
                found.append(f"{rel}:{line} in {function}: {name}")
    assert not found, "unpickling outside the allow-list (the share is hostile: safetensors and JSON only):\n" + "\n".join(found)
    assert used == set(ALLOWED), f"allow-list entries that match nothing any more (remove them): {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize(("source", "expected"), [
    ("import torch\ndef f(p):\n    return torch.load(p, weights_only=False)\n", {("f", "torch.load"), ("f", "weights_only=False")}),
    ("from torch import load as read\ndef f(p):\n    return read(p)\n", {("f", "torch.load")}),
    ("import pickle\nclass C:\n    def m(self, b):\n        return pickle.loads(b)\n", {("C.m", "pickle.loads")}),
    ("import numpy as np\ndef f(p):\n    return np.load(p, allow_pickle=True)\n", {("f", "numpy.load(allow_pickle=True)")}),
    ("import numpy as np\ndef f(p, **kw):\n    return np.load(p, **kw)\n", {("f", "numpy.load(allow_pickle=True)")}),
    ("import joblib\nx = joblib.load('m.joblib')\n", {("<module>", "joblib.load")}),
    ("import dill\n", {("<module>", "dill")}),
    ("def f(pipe, p):\n    return pipe.from_single_file(p)\n", {("f", "from_single_file")}),
    ("import torch\nloader = torch.load\n", {("<module>", "torch.load")}),
    ("def f(m, p):\n    return m.load_state_dict(p, weights_only=flag)\n", {("f", "weights_only=False")}),
])
def test_the_checker_finds_each_way_to_unpickle(source, expected):
    assert {(function, name) for function, name, _ in unpickling_calls(source)} == expected


@pytest.mark.parametrize("source", [
    "import numpy as np\ndef f(p):\n    return np.load(p, allow_pickle=False)\n",
    "import numpy as np\ndef f(p):\n    return np.load(p)\n",  # allow_pickle defaults to False
    "from safetensors.torch import load_file\ndef f(p):\n    return load_file(p)\n",
    "import json\ndef f(b):\n    return json.loads(b)\n",
])
def test_the_checker_lets_safe_reads_be(source):
    assert unpickling_calls(source) == []
