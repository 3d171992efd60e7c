"""The package's layers point only down: every module of ``rega`` sits on one floor of :data:`LAYERS`, and no import
(at the top of a file or inside a function) reaches a higher floor or closes a cycle between modules. And its files
and functions (with the benchmarks') stay short enough to read.

Read by parsing the sources with ``ast``; nothing is imported, so the test takes no time and sees lazy imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rega"

# The floors, lowest first; a module takes the floor of its longest listed prefix. Same-floor imports are allowed.
LAYERS = {
    "rega": 0,  # the package's __init__ (only its version)
    "rega.errors": 0,
    "rega.io": 0,
    "rega.paths": 0,
    "rega.config": 0,
    "rega.model_source": 0,
    "rega.logs": 0,
    "rega.distributed": 0,  # collectives around one rank's work (torch only)
    "rega.data": 1,
    "rega.datamodules": 2,
    "rega.modules": 3,
    "rega.distill": 4,
    "rega.eval": 4,
    "rega.use": 4,
    "rega.callbacks": 5,
    "rega.experiments": 5,
    "rega.plan": 5,  # reads a fit's configuration through rega.lightning_cli
    "rega.cli": 5,
    "rega.lightning_cli": 5,
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The floor of ``module``; None when no entry covers it (the package root covers only itself)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in layers:
            return layers[".".join(parts[:n])]
    return layers.get(module) if module == parts[0] else None


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Project modules that ``source`` imports anywhere; ``from pkg import name`` counts as ``pkg.name`` when that
    is a module, else as ``pkg``."""
    base = module.split(".")[0]
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(anchor + ([target] if target else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
    return {name for name in found if name == base or name.startswith(base + ".")}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {
        name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        - {name}
        for name, path in files.items()
    }


def unplaced(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    return sorted(name for name in graph if layer_of(name, layers) is None)


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    problems = []
    for name, targets in sorted(graph.items()):
        own = layer_of(name, layers)
        for target in sorted(targets):
            above = layer_of(target, layers)
            if own is not None and above is not None and above > own:
                problems.append(f"{name} (layer {own}) imports {target} (layer {above})")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


# --- the package -----------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    assert unplaced(import_graph()) == []


def test_no_import_points_up():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert import_cycles(import_graph()) == []


def test_at_most_six_layers():
    assert set(LAYERS.values()) <= set(range(6))


# --- the checker itself: each rule fails on a synthetic package that breaks it ------------------------------


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A package ``rega`` with a low module ``rega.low`` and a high one ``rega.high``."""
    root = tmp_path / "rega"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "low.py").write_text("import os\n")
    (root / "high.py").write_text("from rega.low import thing\n")
    return root


TINY_LAYERS = {"rega": 0, "rega.low": 0, "rega.high": 1}


def test_checker_accepts_downward_imports(tiny):
    graph = import_graph(tiny)
    assert graph["rega.high"] == {"rega.low"}
    assert upward_imports(graph, TINY_LAYERS) == [] and import_cycles(graph) == []


def test_checker_finds_an_upward_import_inside_a_function(tiny):
    (tiny / "low.py").write_text("def late():\n    from rega.high import thing\n    return thing\n")
    assert upward_imports(import_graph(tiny), TINY_LAYERS) == [
        "rega.low (layer 0) imports rega.high (layer 1)"
    ]


def test_checker_finds_a_cycle(tiny):
    (tiny / "other.py").write_text("from . import high\n")  # relative, resolved to rega.high
    (tiny / "high.py").write_text("import rega.other\n")
    assert import_cycles(import_graph(tiny)) == [["rega.high", "rega.other"]]


def test_checker_finds_a_module_missing_from_the_table(tiny):
    (tiny / "stray.py").write_text("")
    assert unplaced(import_graph(tiny), TINY_LAYERS) == ["rega.stray"]


# --- sizes: short functions, files a reader can hold ----------------------------------------------------------
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def oversized(paths: list[Path]) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES lines, as ``path[:line] name``."""
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if function and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{path.name}:{node.lineno} {node.name}")
    return found


def test_no_long_file_or_function_in_rega_and_benchmarks():
    paths = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").rglob("*.py")]
    assert oversized(paths) == []


def test_size_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    assert oversized([tmp_path / "long.py"]) == ["long.py:1 long"]
