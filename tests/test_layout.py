"""The project's layout: dependencies between its packages point one way (the exchange
side, `handlers`, uses the Parquet side, `storage`, never the reverse), with no cycle.

    .venv/bin/python -m pytest tests/test_layout.py -q     # the check
"""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.helpers import ROOT

PACKAGES = ("handlers", "storage", "service", "research", "simulator")
MODULES = ("config", "markets", "pipeline", "commands", "collector")


def unit_of(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in PACKAGES + MODULES else None


def package_imports() -> dict[str, set[str]]:
    """package -> the project's packages and top modules it imports (anywhere in its files)."""
    graph: dict[str, set[str]] = {}
    for unit in PACKAGES + MODULES:
        files = sorted((ROOT / unit).glob("*.py")) if unit in PACKAGES else [ROOT / f"{unit}.py"]
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
