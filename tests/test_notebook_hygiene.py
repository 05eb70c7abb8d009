"""Every notebook is committed thin and clean: no outputs, one `parameters` cell of literals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvp.params import parameters_cell
from kvp.pipeline import NOTEBOOKS as PLANNED

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Parameters every profile passes to every notebook (OUT_DIR is the run directory).
REQUIRED_PARAMETERS = {"MODEL", "SEED", "OUT_DIR", "FIG_DIR"}


def test_notebook_directory_holds_only_planned_numbered_notebooks():
    assert NOTEBOOK_DIR.is_dir()
    names = [p.stem for p in NOTEBOOKS]
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+", n) for n in names), names
    unplanned = sorted(set(names) - set(PLANNED))
    assert not unplanned, f"add {unplanned} to kvp.pipeline.NOTEBOOKS and to the profiles"


def load_cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def parameter_names(source: str) -> set[str]:
    """Names assigned in a parameters cell; fails unless every statement is `NAME: type = <literal>`
    (or every one `NAME = <literal>`): each parameter is declared once, with its type or without."""
    defaults, schema = parameters_cell(source)  # raises for anything but such literals
    assert not schema or set(schema) == set(defaults), sorted(set(defaults) - set(schema))
    return set(defaults)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    for i, cell in enumerate(load_cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {i} of {path.name} has outputs; clear them"
            assert cell["execution_count"] is None, f"cell {i} of {path.name} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_of_literals(path):
    tagged = [c for c in load_cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} has {len(tagged)} cells tagged 'parameters'; need exactly one"
    assert tagged[0]["cell_type"] == "code"
    names = parameter_names("".join(tagged[0]["source"]))
    assert REQUIRED_PARAMETERS <= names, f"{path.name} must declare {sorted(REQUIRED_PARAMETERS - names)}"
