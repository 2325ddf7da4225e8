"""The package shows the pipeline: stage layers, no import cycles, no upward or private imports.

The checker reads the source with `ast` (nothing is imported), so it also runs on a package written into a
temporary folder: the tests below show it catches a cycle, an upward import, a private import and a
function-level import before trusting it on bmjlib.
"""
from __future__ import annotations

import ast
import re
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bmjlib

PACKAGE = Path(bmjlib.__file__).parent

# Lowest first. A module may import its own layer or a lower one, never a higher one.
LAYERS = [
    ("bmjlib.io", "bmjlib.schema", "bmjlib.runtime", "bmjlib.testing"),
    ("bmjlib.phantom",),
    ("bmjlib.text",),      # below data: the dataset readers parse report sections
    ("bmjlib.data",),
    ("bmjlib.model",),
    ("bmjlib.evaluation",),
    ("bmjlib.icg",),
    ("bmjlib.app",),
    ("bmjlib.bench",),
    ("bmjlib.chain", "bmjlib.cli"),
]
# Modules whose function-level imports are deliberate: the package facade and the CLI's subcommands.
LAZY_OK = {"bmjlib", "bmjlib.cli"}


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def layer_of(name: str, layers=LAYERS) -> int | None:
    for i, group in enumerate(layers):
        if any(name == g or name.startswith(g + ".") for g in group):
            return i
    return None


def imports(path: Path, name: str, known: dict[str, Path]):
    """Yield (target module, imported names, line, inside a function) for every import of a package module."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"

    def visit(node, in_func):
        for ch in ast.iter_child_nodes(node):
            func = in_func or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name in known:
                        yield a.name, [], ch.lineno, in_func
            elif isinstance(ch, ast.ImportFrom):
                if ch.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (ch.level - 1)]
                    mod = ".".join(base + ([ch.module] if ch.module else []))
                else:
                    mod = ch.module or ""
                if mod in known:
                    names = [a.name for a in ch.names]
                    subs = [n for n in names if f"{mod}.{n}" in known]
                    yield mod, [n for n in names if n not in subs], ch.lineno, in_func
                    for s in subs:
                        yield f"{mod}.{s}", [], ch.lineno, in_func
            yield from visit(ch, func)

    yield from visit(tree, False)


def problems(root: Path, layers=LAYERS, lazy_ok=frozenset(LAZY_OK)) -> list[str]:
    known = module_names(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    found = []
    for name, path in sorted(known.items()):
        for target, names, line, in_func in imports(path, name, known):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target != name and not (name.startswith(target + ".") and target in known
                                       and known[target].name == "__init__.py"):
                graph[name].add(target)
            if in_func and name not in lazy_ok:
                found.append(f"{where}: function-level import of {target} (import at the top of the module)")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{where}: imports private name(s) {private} from {target}")
            lo, hi = layer_of(name, layers), layer_of(target, layers)
            if name in lazy_ok or name == root.name:
                continue
            if lo is None:
                found.append(f"{where}: module {name} is in no layer")
            elif hi is not None and hi > lo:
                found.append(f"{where}: upward import: {name} (layer {lo}) imports {target} (layer {hi})")
    # cycles: Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    found += [f"import cycle: {' <-> '.join(c)}" for c in sccs]
    return found


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


TOY_LAYERS = [("pkg.core",), ("pkg.low",), ("pkg.high",)]


def test_checker_accepts_a_clean_toy_package(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/core.py": "X = 1\n",
                            "pkg/low/__init__.py": "", "pkg/low/a.py": "from pkg.core import X\n",
                            "pkg/high/__init__.py": "", "pkg/high/b.py": "from pkg.low.a import X\n"})
    assert problems(pkg, TOY_LAYERS, frozenset()) == []


def test_checker_catches_a_cycle_an_upward_import_a_private_name_and_a_lazy_import(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/core.py": "_SECRET = 1\n",
                            "pkg/low/__init__.py": "",
                            "pkg/low/a.py": "from pkg.low import b\nfrom pkg.high.c import Y\n",
                            "pkg/low/b.py": "from pkg.low import a\nfrom pkg.core import _SECRET\n",
                            "pkg/high/__init__.py": "",
                            "pkg/high/c.py": "Y = 2\ndef f():\n    from pkg.core import _SECRET\n"})
    found = problems(pkg, TOY_LAYERS, frozenset())
    text = "\n".join(found)
    assert "import cycle: pkg.low.a <-> pkg.low.b" in text
    assert "upward import: pkg.low.a (layer 1) imports pkg.high.c (layer 2)" in text
    assert "imports private name(s) ['_SECRET'] from pkg.core" in text
    assert "pkg/high/c.py:3: function-level import of pkg.core" in text


def test_bmjlib_has_no_cycle_no_upward_no_private_and_no_function_level_import():
    found = problems(PACKAGE)
    assert found == [], "\n".join(found)


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_no_module_mentions_project_history():
    """Shipped text speaks of the product: no 'issue 9', 'lands with', 'the issue's figure'."""
    pat = re.compile(r"\bissue\s*\d+|\bthe issue'?s?\b|\blands? with\b", re.I)
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert hits == [], "\n".join(hits)


def test_public_api_is_importable_from_the_package_root():
    for name in bmjlib.__all__:
        assert getattr(bmjlib, name) is not None, name
    assert bmjlib.from_pretrained.__doc__
    with pytest.raises(AttributeError):
        bmjlib.no_such_name  # noqa: B018


def test_importing_the_package_root_stays_light():
    """`bmj --help` imports bmjlib.cli; neither may pull in torch (the API resolves on first use)."""
    code = "import sys, bmjlib, bmjlib.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_module_imports():
    for name in sorted(module_names(PACKAGE)):
        importlib.import_module(name)
