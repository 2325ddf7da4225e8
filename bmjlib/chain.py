"""The chain runner: execute the numbered notebooks in order with papermill (DESIGN "The chain").

`bmj reproduce --profile NAME` runs notebooks/NN_*.ipynb into a run folder (never over the sources),
passing each notebook the profile values it declares in its `parameters` cell. A failing cell stops the
chain with the notebook's name, the cell index and the exception. `chain.json` in the run folder records
every completed step with the fingerprint of its notebook source and parameters, so `--from N` can reuse
earlier outputs and a rerun with unchanged inputs skips steps that are already done.

What notebooks 04-10 would otherwise each repeat: `figures_folder` (where figures and tables go),
`model_names` (the models of a scale, Table 1's rows) and `sampler_settings` (§5.1's sampler, guidance
"auto" resolved to notebook 05's choice on validation pairs).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from bmjlib.evaluation.counterfactuals import DEMO_MODELS, PAPER_MODELS, resolve_guidance
from bmjlib.io import atomic_write_json, fingerprint, sha256_file
from bmjlib.runtime import load_profile, repo_root, resolve

STEP_RE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")
# Profile keys whose values are paths; relative ones are resolved against the working directory.
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file")
# Parameter names that look like credentials are refused: papermill writes parameters into the notebook.
SECRET_RE = re.compile(r"(api_?key|secret|token|password|passwd|credential)", re.I)


def figures_folder(run_dir: str | os.PathLike, figures_dir: str | os.PathLike = "") -> Path:
    """Where a notebook writes its figures and tables: the profile's `figures_dir`, or <run>/figures if empty."""
    return resolve(figures_dir) if figures_dir else resolve(run_dir) / "figures"


def model_names(model_scale: str) -> list[str]:
    """The models a scale generates and scores (notebooks 06, 07, 09): the demo's own four, plus Stable
    Diffusion v1.5 and InstructPix2Pix at paper scale."""
    return PAPER_MODELS if model_scale == "paper" else DEMO_MODELS


def sampler_settings(run_dir: str | os.PathLike, scheduler: str, sample_steps: int, text_scale,
                     image_scale) -> dict:
    """The sampler's settings (steps, scheduler, text and image guidance scales); a scale "auto" is the one
    notebook 05 chose on validation pairs (`counterfactuals.resolve_guidance`)."""
    text_scale, image_scale = resolve_guidance(run_dir, text_scale, image_scale)
    return dict(steps=sample_steps, scheduler=scheduler, text_scale=text_scale, image_scale=image_scale)


class ChainError(RuntimeError):
    """A step of the chain failed; the message names the notebook, the cell and the exception."""


@dataclass
class Step:
    number: int
    name: str
    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem


def discover_steps(notebook_dir: Path | None = None) -> list[Step]:
    notebook_dir = notebook_dir or repo_root() / "notebooks"
    steps = []
    for p in sorted(notebook_dir.iterdir()):
        m = STEP_RE.match(p.name)
        if m:
            steps.append(Step(int(m.group(1)), m.group(2), p))
    return steps


def check_no_secrets(params: dict[str, Any]) -> None:
    bad = [k for k in params if SECRET_RE.search(k)]
    if bad:
        raise ValueError(
            f"profile keys {bad} look like credentials; secrets never pass as notebook parameters "
            "(papermill writes parameters into the executed notebook). Set them as environment "
            "variables instead (e.g. OPENAI_API_KEY, AZURE_OPENAI_API_KEY).")


def _absolutise(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for k, v in params.items():
        if k.endswith(PATH_SUFFIXES) and isinstance(v, str) and v:
            out[k] = str(Path(os.path.expanduser(v)).resolve())
    return out


def _declared_parameters(path: Path) -> set[str]:
    return set(pm.inspect_notebook(str(path)).keys())


def run_chain(profile: str | dict[str, Any], out: str | os.PathLike | None = None, start: int | None = None,
              stop: int | None = None, force: bool = False, notebook_dir: Path | None = None,
              log=print) -> Path:
    """Execute steps `start`..`stop` (inclusive) of the chain into the run folder; return that folder."""
    values = load_profile(profile) if isinstance(profile, str) else dict(profile)
    check_no_secrets(values)
    name = values.get("profile", "custom")
    run_dir = Path(out or values.get("run_dir") or f"runs/{name}").expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    values = _absolutise(values)
    values["run_dir"] = str(run_dir)
    values["figures_dir"] = str(Path(values.get("figures_dir") or run_dir / "figures").resolve())
    values["profile"] = name

    steps = discover_steps(notebook_dir)
    if not steps:
        raise ChainError(f"no numbered notebooks (NN_name.ipynb) in {notebook_dir or repo_root() / 'notebooks'}")
    lo = start if start is not None else steps[0].number
    hi = stop if stop is not None else steps[-1].number
    state_path = run_dir / "chain.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    # Earlier steps are reused, so they must have completed in this run folder.
    for s in steps:
        if s.number < lo and s.stem not in state:
            raise ChainError(f"--from {lo:02d}: step {s.stem} has not completed in {run_dir}; "
                             f"run it first (e.g. --from {s.number:02d})")

    (run_dir / "notebooks").mkdir(exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    selected = [s for s in steps if lo <= s.number <= hi]
    # An explicit --from asks for those steps to run; a plain rerun skips steps whose inputs are unchanged.
    upstream_changed = start is not None
    t_chain = time.time()
    for i, s in enumerate(selected, 1):
        declared = _declared_parameters(s.path)
        params = {k: v for k, v in values.items() if k in declared}
        key = fingerprint(sha256_file(s.path), params)
        done = state.get(s.stem)
        if not force and not upstream_changed and done and done.get("key") == key:
            log(f"[{i}/{len(selected)}] {s.stem}: up to date (done {done['finished']}), skipped")
            continue
        upstream_changed = True
        out_nb = run_dir / "notebooks" / s.path.name
        log(f"[{i}/{len(selected)}] {s.stem}: running")
        t0 = time.time()
        logger = _step_logger(run_dir / "logs" / f"{s.stem}.log")
        try:
            pm.execute_notebook(str(s.path), str(out_nb), parameters=params, cwd=str(run_dir),
                                progress_bar=sys.stderr.isatty(), log_output=True, kernel_name="python3",
                                stdout_file=None, stderr_file=None, report_mode=False)
        except PapermillExecutionError as e:
            state.pop(s.stem, None)
            atomic_write_json(state_path, state)
            raise ChainError(f"{s.path.name} failed in cell {_source_cell_index(out_nb, e.cell_index)} "
                             f"(0-based, as in the source notebook): {e.ename}: {e.evalue}\n"
                             f"  executed notebook: {out_nb}") from None
        finally:
            for h in list(logger.handlers):
                h.close()
                logger.removeHandler(h)
        dt = time.time() - t0
        state[s.stem] = {"key": key, "seconds": round(dt, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(state_path, state)
        log(f"[{i}/{len(selected)}] {s.stem}: done in {dt:.1f} s")
    log(f"chain {name}: steps {lo:02d}-{hi:02d} finished in {time.time() - t_chain:.1f} s; run folder {run_dir}")
    return run_dir


def _source_cell_index(executed: Path, index: int) -> int:
    """Map a cell index of the executed copy back to the source notebook (papermill inserts a cell)."""
    try:
        cells = nbformat.read(str(executed), as_version=4).cells
    except Exception:
        return index
    injected = sum("injected-parameters" in c.metadata.get("tags", []) for c in cells[:index])
    return index - injected


def _step_logger(path: Path) -> logging.Logger:
    """Route papermill's cell output log (log_output=True) to one file per step."""
    logger = logging.getLogger("papermill")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger
