"""The package's import graph, read with ``ast`` from the sources (imports at module top and inside functions):
no circles, stage packages import only the layers below them, and no module imports another's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "darkhaloscope"

# The layers, bottom up. A module may import its own layer and the layers listed for it; anything else is an
# arrow that climbs back up. "base": the top-level modules every stage shares (errors, values, io, metrics).
LAYERS = {
    "base": {"base"},
    "stamps": {"base", "stamps"},
    "simulation": {"base", "stamps", "simulation"},
    "learning": {"base", "stamps", "learning"},
    "evaluation": {"base", "stamps", "learning", "evaluation"},
    "sky": {"base", "stamps", "simulation", "learning", "evaluation", "sky"},
    "cli": {"base", "cli"},  # cli.py loads the step modules by name (importlib), never by import
}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return parts[1]
    return "cli" if parts[-1] in ("cli", "__main__") else "base"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the imports under ``if TYPE_CHECKING:`` (annotations only: never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return skip


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str | None, bool]]:
    """(importer, imported module, imported name or None, runs at import or call time) for every import of the
    package's own modules, at module top or inside a function."""
    edges = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            runs = id(node) not in typing_only
            if isinstance(node, ast.Import):
                edges += [(name, a.name, None, runs) for a in node.names if a.name.split(".")[0] == PACKAGE]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((name, sub, None, runs) if sub in mods else (name, target, alias.name, runs))
    return edges


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, imports(mods)


def test_the_graph_is_read(graph):
    mods, edges = graph
    assert {"darkhaloscope.simulation.inject", "darkhaloscope.learning.train", "darkhaloscope.metrics"} <= set(mods)
    # an import inside a function counts: dhs's dispatcher is the only one that loads modules by name
    assert ("darkhaloscope.simulation.inject", "darkhaloscope.simulation.real_hosts", "run_inject", True) in edges
    unknown = {t for _, t, _, _ in edges if t not in mods}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_no_import_circles(graph):
    mods, edges = graph
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    g.add_edges_from((a, b) for a, b, _, runs in edges if runs and a != b)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_stages_import_only_the_layers_below(graph):
    _, edges = graph
    climbing = sorted({(a, b) for a, b, _, _ in edges if layer(b) not in LAYERS[layer(a)]})
    assert not climbing, "arrows that climb back up: " + "; ".join(f"{a} -> {b}" for a, b in climbing)


def test_no_private_names_across_modules(graph):
    _, edges = graph
    private = sorted({(a, b, n) for a, b, n, _ in edges if n and n.startswith("_") and a != b})
    assert not private, "private imports: " + "; ".join(f"{a} imports {b}.{n}" for a, b, n in private)


def test_the_layering_catches_a_climbing_arrow():
    """The rule itself: simulation -> sky and learning -> evaluation climb; sky -> simulation does not."""
    assert layer("darkhaloscope.simulation.physics.render") == "simulation"
    assert layer("darkhaloscope.metrics") == "base" and layer("darkhaloscope.cli") == "cli"
    assert layer("darkhaloscope.sky.hosts") not in LAYERS[layer("darkhaloscope.simulation.inject")]
    assert layer("darkhaloscope.evaluation.metrics") not in LAYERS[layer("darkhaloscope.learning.train")]
    assert layer("darkhaloscope.simulation.draws") in LAYERS[layer("darkhaloscope.sky.cutouts")]
