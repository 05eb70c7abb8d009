"""The package reads top to bottom: a module imports only modules of its own layer or below.

The order is docs/README.md#layers; every import of a kvp module counts, at module level and
inside functions alike. A module's ``if __name__ == "__main__":`` block is its command line, run
only as a script: it stands above every layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvp"

# Lowest first. A package (methods/, data/) is one unit.
LAYERS = [
    ("kvp", "models", "rope", "flops", "metrics", "results", "generate", "compact", "distributed"),
    ("cache", "packet", "blockmask", "recompute"),
    ("methods", "data"),
    ("evaluate", "attention", "compress", "train", "query_step", "kernels", "bench", "adapters",
     "params", "scaling"),
    ("plots",),
    ("viewer", "widgets"),
    ("report", "pipeline", "redraw", "compact_eval"),
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``kvp.methods.base`` → ``methods``; ``kvp`` (the package's own ``__init__``) → ``kvp``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvp"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__"
                    for c in test.comparators))


def kvp_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported kvp module) of every import in ``path`` outside its ``__main__`` block;
    ``from kvp import kernels`` is an import of ``kvp.kernels``."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_main_block(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names
                             if a.name.split(".")[0] == "kvp")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "kvp":
                if child.module == "kvp":
                    found.extend((child.lineno, f"kvp.{a.name}" if (SRC / f"{a.name}.py").exists()
                                  or (SRC / a.name).is_dir() else "kvp") for a in child.names)
                else:
                    found.append((child.lineno, child.module))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {unit_of(module_name(p)) for p in MODULES}
    assert units - set(LAYER) == set(), "place the new module in LAYERS and in docs/README.md"
    assert set(LAYER) - units == set(), "LAYERS names a module that does not exist"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_higher_layer(path):
    unit = unit_of(module_name(path))
    upward = [f"line {line}: {target} (layer {LAYER[unit_of(target)]})"
              for line, target in kvp_imports(path) if LAYER[unit_of(target)] > LAYER[unit]]
    assert not upward, f"{path.name} (layer {LAYER[unit]}) imports upward: {upward}"


def test_units_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        unit = unit_of(module_name(path))
        graph.setdefault(unit, set()).update(
            unit_of(t) for _, t in kvp_imports(path) if unit_of(t) != unit)
    done: set[str] = set()

    def walk(unit: str, trail: tuple[str, ...]) -> None:
        assert unit not in trail, f"import cycle: {' -> '.join([*trail, unit])}"
        if unit in done:
            return
        for target in sorted(graph.get(unit, ())):
            walk(target, (*trail, unit))
        done.add(unit)

    for unit in sorted(graph):
        walk(unit, ())


def test_the_check_sees_function_level_and_main_block_imports(tmp_path):
    """The parser must catch an import hidden in a function (it could fail), and skip only the
    ``__main__`` block."""
    path = tmp_path / "probe.py"
    path.write_text("import os\nfrom kvp import plots\n\ndef f():\n    from kvp.report import main\n"
                    "\nif __name__ == '__main__':\n    from kvp.pipeline import main\n")
    assert kvp_imports(path) == [(2, "kvp.plots"), (5, "kvp.report")]


def test_docs_and_readme_name_the_same_layers():
    """docs/README.md#layers lists LAYERS in order; README.md's module table names every module."""
    root = SRC.parents[1]
    text = (root / "docs" / "README.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    items = [line.split("—")[0] for line in section.splitlines() if line[:1].isdigit()]
    listed = [tuple(n.strip("/") for n in re.findall(r"`([a-z_/]+)`", item)) for item in items]
    assert listed == [tuple(u for u in units if u != "kvp") for units in LAYERS]
    table = (root / "README.md").read_text().split("## The library", 1)[1].split("\n## ", 1)[0]
    rows = {n.strip("/") for line in table.splitlines() if line.startswith("| `")
            for n in re.findall(r"`([a-z_/]+)`", line.split("|")[1])}
    assert rows == set(LAYER) - {"kvp"}
