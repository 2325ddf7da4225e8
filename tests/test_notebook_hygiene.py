"""Committed notebooks are stripped, parameterised and default to the smoke profile."""
import ast
import json
from pathlib import Path

import pytest

from bmjlib.chain import STEP_RE, load_profile

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _parameters_cells(nb):
    return [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_outputs_no_execution_counts(path):
    nb = json.loads(path.read_text())
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            assert c.get("outputs") == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert c.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    assert "papermill" not in nb["metadata"], f"{path.name} is an executed copy, not a source notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exactly_one_parameters_cell_of_flat_literals(path):
    nb = json.loads(path.read_text())
    cells = _parameters_cells(nb)
    assert len(cells) == 1, f"{path.name} has {len(cells)} cells tagged 'parameters', needs exactly one"
    tree = ast.parse("".join(cells[0]["source"]))
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, \
            f"{path.name}: the parameters cell holds only `name = literal` lines"
        ast.literal_eval(node.value)  # raises if not a flat literal
    assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name} opens with a markdown cell (its title)"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if STEP_RE.match(p.name)], ids=lambda p: p.name)
def test_defaults_are_the_smoke_profile(path):
    """nbval runs the notebooks with their defaults, so those defaults must be the smoke profile."""
    nb = json.loads(path.read_text())
    tree = ast.parse("".join(_parameters_cells(nb)[0]["source"]))
    smoke = load_profile("smoke")
    for node in tree.body:
        name = node.targets[0].id
        value = ast.literal_eval(node.value)
        if name == "run_dir":
            assert value == "runs/smoke", f"{path.name}: run_dir default must be 'runs/smoke'"
        elif name == "figures_dir":
            assert value in ("", "runs/smoke/figures"), f"{path.name}: figures_dir default"
        elif name in smoke:
            assert value == smoke[name], f"{path.name}: default {name}={value!r} differs from smoke's {smoke[name]!r}"
