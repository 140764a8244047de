"""The project's layout: dependencies between its packages point one way (the exchange
side, `handlers`, uses the Parquet side, `storage`, never the reverse), with no cycle; no
product code imports the test tools (`simulator`, `tests`, `bench`); the README's code map
names every package and sub-package there is.

    .venv/bin/python -m pytest tests/test_layout.py -q     # the check
"""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.helpers import ROOT

PACKAGES = ("handlers", "storage", "service", "serve", "research", "simulator", "tests", "bench")
PRODUCT = ("handlers", "storage", "service", "serve", "research", "config", "markets", "pipeline", "commands", "collector")
MODULES = ("config", "markets", "pipeline", "commands", "collector")


def unit_of(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in PACKAGES + MODULES else None


def package_imports() -> dict[str, set[str]]:
    """package -> the project's packages and top modules it imports (anywhere in its files)."""
    graph: dict[str, set[str]] = {}
    for unit in PACKAGES + MODULES:
        files = sorted((ROOT / unit).rglob("*.py")) if unit in PACKAGES else [ROOT / f"{unit}.py"]
        deps = graph.setdefault(unit, set())
        for path in files:
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                deps.update(u for u in map(unit_of, names) if u and u != unit)
    return graph


def test_storage_never_imports_the_exchange_side():
    graph = package_imports()
    assert "handlers" not in graph["storage"], graph["storage"]
    assert "handlers" in graph  # and the other way round is what the design expects
    assert "storage" in graph["handlers"]


def test_no_cycle_between_packages():
    graph = package_imports()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle between packages: {e.args[1]}") from None
    assert order.index("storage") < order.index("handlers") < order.index("collector")


def test_no_product_code_imports_the_test_tools():
    graph = package_imports()
    for unit in PRODUCT:
        assert not graph[unit] & {"simulator", "tests", "bench"}, (unit, graph[unit])


def test_the_readme_code_map_names_every_package():
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("Code map"):]
    code_map = code_map[:code_map.index("Dependencies point one way")]
    packages = [p.parent.relative_to(ROOT).as_posix() for top in ROOT.iterdir()
                if top.is_dir() and not top.name.startswith(".") for p in top.rglob("__init__.py")]
    for package in packages:
        assert f"`{package}/`" in code_map, package
    for unit in MODULES:
        assert f"`{unit}.py`" in code_map, unit
