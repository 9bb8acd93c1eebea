"""The packages' layers point one way, and no module imports itself round a cycle.

    r1ray (the command line) > recipes > cluster (the driver) > learner > actors, rewards > common

A package imports only from the packages below it (every import counts, those inside
functions too): the parts (actors/, rewards/, learner/) never reach up into the driver, and
the driver never into the recipes. Siblings stay apart except where the table says so: the
learner trains the preference model that rewards/preference.py serves, and reads its pairs
with rewards/data.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BELOW = {
    "common": set(),
    "actors": {"common"},
    "rewards": {"common"},
    "learner": {"common", "rewards"},
    "cluster": {"common", "actors", "rewards", "learner"},
    "recipes": {"common", "actors", "rewards", "learner", "cluster"},
    "r1ray": {"common", "actors", "rewards", "learner", "cluster", "recipes"},
}
"""Each package, and the packages it may import."""


def project_modules() -> dict[str, Path]:
    """Every module of the packages in `BELOW`, by dotted name."""
    modules = {}
    for package in BELOW:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it: `from a import b` counts as a.b when
    a.b is a module, else as a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Each import that breaks `BELOW`, as "importer -> imported"."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if a.split(".")[0] != b.split(".")[0] and b.split(".")[0] not in BELOW[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_find_an_upward_import_and_a_cycle():
    graph = {"actors.rollout": {"cluster.config", "common.records"}, "cluster.config": {"actors.config"},
             "actors.config": set(), "common.records": set(),
             "cluster.cli": {"cluster.train"}, "cluster.train": {"cluster.eval"}, "cluster.eval": {"cluster.cli"}}
    assert upward(graph) == ["actors.rollout -> cluster.config"]
    assert cycles(graph) == [["cluster.cli", "cluster.eval", "cluster.train"]]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_package_is_in_the_table(graph):
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(packages) == set(BELOW)
    assert {"cluster.train", "learner.grpo", "common.weight_sync"} <= set(graph)


def test_layers_point_one_way(graph):
    assert upward(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []
