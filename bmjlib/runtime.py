"""Where a run lives and how it uses the machine: profiles, paths from notebook parameters, step folders,
CPU threads.

Notebooks run with their own folder as cwd under JupyterLab and nbval but inside the run folder under
papermill (DESIGN "The chain"), so every path a notebook or the library takes from a parameter is resolved
here against the repository root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

# The packaged profiles (smoke, demo, paper): flat name: value files, one block per notebook.
PROFILE_DIR = Path(__file__).parent / "profiles"


def repo_root() -> Path:
    """The checkout that holds `notebooks/` (bmjlib's parent for an editable install), else the cwd."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "notebooks").is_dir() else Path.cwd()


def resolve(path: str | os.PathLike) -> Path:
    """Resolve a path from a notebook parameter: absolute stays, relative is taken from the repo root.

    Notebooks run with their own folder as cwd under JupyterLab and nbval but inside the run folder
    under papermill, so every path a notebook uses goes through here.
    """
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (repo_root() / p).resolve()


def step_dir(run_dir: str | os.PathLike, step: str) -> Path:
    """The output folder of one step inside a run, e.g. step_dir(run, '02_registration'); created."""
    d = resolve(run_dir) / step
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_profile(name_or_file: str) -> dict[str, Any]:
    """Load a profile: a packaged name (smoke, demo, paper) or a YAML file of flat values.

    A profile file may say `base: demo` to start from a packaged profile and override a few values.
    """
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"profile file {p} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"profile {p}: expected a mapping of name: value, got {type(values).__name__}")
        base = values.pop("base", None)
        merged = load_profile(base) if base else {}
        merged.update(values)
        merged["profile"] = values.get("profile", p.stem)
        return merged
    packaged = PROFILE_DIR / f"{name_or_file}.yaml"
    if not packaged.exists():
        names = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no profile named {name_or_file!r} (packaged: {names}; or give a .yaml file)")
    values = yaml.safe_load(packaged.read_text()) or {}
    base = values.pop("base", None)
    merged = load_profile(base) if base else {}
    merged.update(values)
    merged["profile"] = name_or_file
    return merged


def fit_cpu_threads() -> int:
    """Use one intra-op thread when the CPU is oversubscribed (load average above the core count): OpenMP's
    spin-waiting then makes a 2-thread step ~20x slower than a 1-thread one (measured on the 2-core machine
    at load 17: 25 s vs 1 s per demo UNet step). Otherwise keep torch's default. Returns the thread count."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > cores
    except OSError:
        busy = False
    if busy and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    return torch.get_num_threads()
