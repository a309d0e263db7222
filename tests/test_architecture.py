"""The package boundaries docs/architecture.md draws: the compute side imports nothing from
the HTTP side, no import cycles, route modules independent of each other, no torch on the
API side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: import name prefix -> folder, as pyproject.toml's package-dir maps them
ROOTS = {
    "layertrack.service": REPO / "service",
    "layertrack.workers": REPO / "workers",
    "layertrack.integrations": REPO / "integrations",
    "layertrack.migrations": REPO / "migrations",
}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            if "probe_data" in path.parts or "versions" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every layertrack module ``name`` imports, at module level or inside a function."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import jobs` names a module
    return {m for m in out if m.startswith("layertrack.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(name, path) if m in mods and m != name} for name, path in mods.items()}


def test_the_compute_side_imports_nothing_from_the_http_side(graph):
    offenders = {m: sorted(d for d in deps if d.startswith("layertrack.service"))
                 for m, deps in graph.items() if m.startswith("layertrack.workers")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_there_is_no_import_cycle(graph):
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = [*stack[stack.index(node):], node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for dep in sorted(graph[node]):
            if dep.rpartition(".")[0] == node or node.startswith(dep + "."):
                continue  # a package and its own submodules
            visit(dep, [*stack, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_route_modules_do_not_import_each_other(graph):
    routes = "layertrack.service.api.routes."
    crossing = {m: sorted(d for d in deps if d.startswith(routes)) for m, deps in graph.items()
                if m.startswith(routes)}
    assert {m: d for m, d in crossing.items() if d} == {}


def test_the_api_side_imports_no_torch():
    code = ("import sys; import layertrack.service.api, layertrack.service.main, layertrack.service.queue, "
            "layertrack.service.client, layertrack.service.cli, layertrack.workers.vocabulary, "
            "layertrack.workers.checkpoint; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
