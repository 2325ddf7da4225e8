"""Build small notebooks in tests (and in scripts that create the chain's notebooks)."""
from __future__ import annotations

from pathlib import Path

import nbformat


def make_notebook(path: str | Path, cells: list[tuple[str, str]], parameters: str | None = None) -> Path:
    """Write a notebook. `cells` are (kind, source) with kind 'md' or 'code'; `parameters` is the
    source of the one cell tagged `parameters`, inserted after the first markdown cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = []
    for kind, src in cells:
        out.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    if parameters is not None:
        pc = nbformat.v4.new_code_cell(parameters)
        pc.metadata["tags"] = ["parameters"]
        at = 1 if out and out[0].cell_type == "markdown" else 0
        out.insert(at, pc)
    nb.cells = out
    for c in nb.cells:  # deterministic ids keep diffs clean
        c.pop("id", None)
    nb.nbformat_minor = 4
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path
