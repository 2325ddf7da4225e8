"""The chain runner: execute the numbered notebooks in order with papermill (DESIGN "The chain").

`bmj reproduce --profile NAME` runs notebooks/NN_*.ipynb into a run folder (never over the sources),
passing each notebook the profile values it declares in its `parameters` cell. A failing cell stops the
chain with the notebook's name, the cell index and the exception.

A step is up to date only when nothing it depends on changed. `chain.json` records, per completed step, a
key over its notebook source, its parameters, the run's thread count, the sha256 of every bmjlib module the
notebook imports (transitively: `code_files`) and the keys and outputs of the steps before it, plus a listing
of its own outputs (the run's NN_* folders and the executed notebook, by size and mtime). A plain rerun redoes a step
whose key changed or whose outputs are missing or altered, and everything after it; `--from N` reruns N and
after on purpose.

Before anything runs the profile is validated (step range, unknown keys with the nearest known one, types
against the notebooks' defaults, `base:` cycles), the run folder may not hold the source notebooks, a lock
refuses a second run on the same folder, and temporary files a killed step left behind are removed.

Keys the runner reads itself: `figures_dir` (where figures and tables go: `runtime.figures_dir_for`, inside the
run folder unless the packaged demo profile), `threads`, `figure_credit` (a line stamped on every figure the
run saves, e.g. the licence attribution of a real cohort's images; part of every step's key when set) and
`last_step` (the profile's last step when `--to` is not given).

What notebooks 04-10 would otherwise each repeat: `figures_folder` (where figures and tables go),
`model_names` (the models of a scale, Table 1's rows) and `sampler_settings` (§5.1's sampler, guidance
"auto" resolved to notebook 05's choice on validation pairs).
"""
from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from bmjlib.evaluation.counterfactuals import DEMO_MODELS, PAPER_MODELS, resolve_guidance
from bmjlib.io import (CREDIT_ENV, PACKAGE_DIR, atomic_write_json, code_fingerprint_of, fingerprint, imports_of,
                       sha256_file)
from bmjlib.runtime import (PROFILE_DIR, STAMP_FORMAT, THREADS_ENV, TIMINGS_ENV, figures_dir_for, load_profile,
                            repo_root, resolve, run_threads)
from bmjlib.text.llm import secret_problem

STEP_RE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")
# Profile keys whose values are paths; relative ones are resolved against the working directory, except
# figures_dir, which follows `runtime.figures_dir_for` (inside the run folder unless the packaged demo profile).
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file")
# Parameter names that look like credentials are refused: papermill writes parameters into the notebook.
SECRET_RE = re.compile(r"(api_?key|secret|token|password|passwd|credentials?(?![a-z]))", re.I)


def figures_folder(run_dir: str | os.PathLike, figures_dir: str | os.PathLike = "") -> Path:
    """Where a notebook writes its figures and tables: the profile's `figures_dir`, or <run>/figures if empty.
    Under `bmj reproduce` the value is already absolute (`runtime.figures_dir_for` applied the profile's rule);
    a relative value typed into a notebook by hand is taken from the repository root, like every path."""
    return resolve(figures_dir) if figures_dir else resolve(run_dir) / "figures"


def model_names(model_scale: str) -> list[str]:
    """The models a scale generates and scores (notebooks 06, 07, 09): the demo's own four, plus Stable
    Diffusion v1.5 and InstructPix2Pix at paper scale."""
    return PAPER_MODELS if model_scale == "paper" else DEMO_MODELS


def sampler_settings(run_dir: str | os.PathLike, scheduler: str, sample_steps: int, text_scale,
                     image_scale, strength: float = 1.0, output: str = "decoded",
                     text_guidance_min_t: float = 0.0, edit_mask: float = 0.0) -> dict:
    """The sampler's settings (steps, scheduler, text and image guidance scales, strength, output: `pipeline.OUTPUTS`,
    text_guidance_min_t and edit_mask: the `BiomedJourneyPipeline.__call__` arguments); a scale "auto" is the one
    notebook 05 chose on validation pairs (`counterfactuals.resolve_guidance`)."""
    text_scale, image_scale = resolve_guidance(run_dir, text_scale, image_scale)
    return dict(steps=sample_steps, scheduler=scheduler, text_scale=text_scale, image_scale=image_scale,
                strength=float(strength), output=output, text_guidance_min_t=float(text_guidance_min_t),
                edit_mask=float(edit_mask))


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
    """Refuse parameters that are, or carry, credentials: papermill writes parameters into the executed
    notebook. Names that look like credentials, and values that look like keys or URLs with a user:key@
    part (`llm.secret_problem`); the message never repeats the value."""
    bad = [k for k in params if SECRET_RE.search(k)]
    if bad:
        raise ChainError(
            f"profile keys {bad} look like credentials; secrets never pass as notebook parameters "
            "(papermill writes parameters into the executed notebook). Set them as environment "
            "variables instead (e.g. OPENAI_API_KEY, AZURE_OPENAI_API_KEY).")
    for k, v in params.items():
        problem = secret_problem(k, v)
        if problem:
            raise ChainError(f"profile key {k}: {problem}; secrets never pass as notebook parameters, "
                             "set them as environment variables")


def _absolutise(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for k, v in params.items():
        if k.endswith(PATH_SUFFIXES) and k != "figures_dir" and isinstance(v, str) and v:
            out[k] = str(Path(os.path.expanduser(v)).resolve())
    return out


def run_chain(profile: str | dict[str, Any], out: str | os.PathLike | None = None, start: int | None = None,
              stop: int | None = None, force: bool = False, notebook_dir: Path | None = None,
              log=print) -> Path:
    """Execute steps `start`..`stop` (inclusive) of the chain into the run folder; return that folder."""
    values = load_profile(profile) if isinstance(profile, str) else dict(profile)
    check_no_secrets(values)
    name = values.get("profile", "custom")
    notebook_dir = Path(notebook_dir or repo_root() / "notebooks").resolve()
    steps = discover_steps(notebook_dir)
    if not steps:
        raise ChainError(f"no numbered notebooks (NN_name.ipynb) in {notebook_dir}")
    if stop is None and values.get("last_step") not in (None, ""):  # a profile may end the chain early
        stop = values["last_step"]
        if isinstance(stop, bool) or not isinstance(stop, int):
            raise ChainError(f"profile key last_step: {stop!r} must be a step number")
    lo, hi = _step_range(steps, start, stop)
    parameters = {s.stem: notebook_parameters(s.path) for s in steps}
    check_profile(values, parameters)
    declared = {stem: set(p) for stem, p in parameters.items()}
    run_dir = Path(out or values.get("run_dir") or f"runs/{name}").expanduser().resolve()
    if run_dir == notebook_dir or notebook_dir.is_relative_to(run_dir):
        raise ChainError(f"--out {run_dir}: the run folder may not contain the source notebooks ({notebook_dir}); "
                         "choose a folder of its own, e.g. runs/NAME")
    run_dir.mkdir(parents=True, exist_ok=True)
    values = _absolutise(values)
    values["run_dir"] = str(run_dir)
    values["figures_dir"] = str(figures_dir_for(profile, values.get("figures_dir"), run_dir))
    values["profile"] = name
    threads = run_threads(values.get("threads") or 0)
    with _RunLock(run_dir):
        removed = remove_temporaries(run_dir)
        if removed:
            log(f"removed {removed} temporary file(s) left by an interrupted run")
        return _run_steps(steps, declared, values, run_dir, lo, hi, start is not None, force, threads, name, log)


def _run_steps(steps, declared, values, run_dir, lo, hi, explicit, force, threads, name, log) -> Path:
    state_path = run_dir / "chain.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state = {k: v for k, v in state.items() if isinstance(v, dict)}
    # Earlier steps are reused, so they must have completed in this run folder.
    for s in steps:
        if s.number < lo and s.stem not in state:
            raise ChainError(f"--from {lo:02d}: step {s.stem} has not completed in {run_dir}; "
                             f"run it first (e.g. --from {s.number:02d})")
    (run_dir / "notebooks").mkdir(exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    os.environ[THREADS_ENV] = str(threads)  # the notebook kernels inherit it (runtime.use_run_threads)
    os.environ[TIMINGS_ENV] = str(run_dir / "logs" / "timings.jsonl")  # runtime.record_timing
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    # the profile's figure credit (e.g. a real cohort's attribution), stamped on every figure (io.save_figure)
    credit = str(values.get("figure_credit") or "").strip()
    if credit:
        os.environ[CREDIT_ENV] = credit
    else:
        os.environ.pop(CREDIT_ENV, None)
    selected = [s for s in steps if lo <= s.number <= hi]
    # What a step builds on: each earlier step's key and its outputs as they are now (a rerun writes new ones).
    upstream: list[str] = [fingerprint(state[s.stem]["key"], state[s.stem].get("outputs")) for s in steps
                           if s.number < lo]
    rerun_all = explicit  # an explicit --from asks for those steps to run
    t_chain = time.time()
    for i, s in enumerate(selected, 1):
        params = {k: v for k, v in values.items() if k in declared[s.stem]}
        key = step_key(s.path, dict(params, figure_credit=credit) if credit else params, threads, upstream)
        done = state.get(s.stem)
        why = _stale(done, key, run_dir, s)
        if not force and not rerun_all and why is None:
            log(f"[{i}/{len(selected)}] {s.stem}: up to date (done {done['finished']}), skipped")
            upstream.append(fingerprint(key, done["outputs"]))
            continue
        out_nb = run_dir / "notebooks" / s.path.name
        log(f"[{i}/{len(selected)}] {s.stem}: running" + (f" ({why})" if why and not (force or rerun_all) else ""))
        t0 = time.time()
        state.pop(s.stem, None)
        atomic_write_json(state_path, state)
        logger = _step_logger(run_dir / "logs" / f"{s.stem}.log")
        try:
            pm.execute_notebook(str(s.path), str(out_nb), parameters=params, cwd=str(run_dir),
                                progress_bar=sys.stderr.isatty(), log_output=True, kernel_name="python3",
                                stdout_file=None, stderr_file=None, report_mode=False)
        except PapermillExecutionError as e:
            raise ChainError(f"{s.path.name} failed in cell {_source_cell_index(out_nb, e.cell_index)} "
                             f"(0-based, as in the source notebook): {e.ename}: {e.evalue}\n"
                             f"  executed notebook: {out_nb}") from None
        finally:
            for h in list(logger.handlers):
                h.close()
                logger.removeHandler(h)
        dt = time.time() - t0
        state[s.stem] = {"key": key, "outputs": outputs_digest(run_dir, s), "threads": threads,
                         "seconds": round(dt, 1), "finished": time.strftime(STAMP_FORMAT)}
        atomic_write_json(state_path, state)
        upstream.append(fingerprint(key, state[s.stem]["outputs"]))
        log(f"[{i}/{len(selected)}] {s.stem}: done in {dt:.1f} s")
    log(f"chain {name}: steps {lo:02d}-{hi:02d} finished in {time.time() - t_chain:.1f} s; run folder {run_dir}")
    return run_dir


def _step_range(steps: list[Step], start: int | None, stop: int | None) -> tuple[int, int]:
    numbers = [s.number for s in steps]
    span = f"steps {numbers[0]:02d}-{numbers[-1]:02d}"
    for flag, v in (("--from", start), ("--to", stop)):
        if v is not None and v not in numbers:
            raise ChainError(f"{flag} {v}: no such step ({span})")
    lo = numbers[0] if start is None else start
    hi = numbers[-1] if stop is None else stop
    if lo > hi:
        raise ChainError(f"--from {lo:02d} --to {hi:02d}: the first step comes after the last")
    return lo, hi


# --------------------------------------------------------------------------- what a step depends on

def step_key(notebook: Path, params: dict, threads: int, upstream: list[str]) -> str:
    """The fingerprint of one step: notebook source, parameters, threads, its bmjlib code, earlier steps."""
    return fingerprint(sha256_file(notebook), params, threads, code_fingerprint(notebook), upstream)


def _stale(done: dict | None, key: str, run_dir: Path, step: Step) -> str | None:
    """Why a recorded step must run again (None: it is up to date)."""
    if not done:
        return "not run yet"
    if done.get("key") != key:
        return "its notebook, parameters, code or an earlier step changed"
    if done.get("outputs") != outputs_digest(run_dir, step):
        return "its outputs are missing or were changed"
    return None


def step_outputs(run_dir: Path, step: Step) -> list[Path]:
    """A step's outputs: its executed notebook and the run's folders named NN_* for its number."""
    folders = sorted(p for p in run_dir.glob(f"{step.number:02d}_*") if p.is_dir())
    files = [run_dir / "notebooks" / step.path.name]
    for d in folders:
        files += sorted(f for f in d.rglob("*") if f.is_file())
    return files


def outputs_digest(run_dir: Path, step: Step) -> str:
    """Fingerprint of a step's outputs by path, size and modification time (cheap; detects a deleted,
    added or rewritten file)."""
    rows = []
    for f in step_outputs(run_dir, step):
        try:
            st = f.stat()
        except FileNotFoundError:
            rows.append((str(f.relative_to(run_dir)), -1, -1))
            continue
        rows.append((str(f.relative_to(run_dir)), st.st_size, st.st_mtime_ns))
    return fingerprint(rows)


def notebook_imports(notebook: Path, package: str = "bmjlib") -> set[str]:
    """The `package` modules a notebook's code cells import (IPython magics and shell lines skipped)."""
    names = set()
    for cell in nbformat.read(str(notebook), as_version=4).cells:
        if cell.cell_type != "code":
            continue
        src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            names |= imports_of(ast.parse(src), package)
        except SyntaxError:
            continue
    return names


def code_fingerprint(notebook: Path, root: Path = PACKAGE_DIR) -> str:
    """sha256 over the package code a notebook runs (`code_files` of its imports): a fix in a metric reruns
    the evaluation, not the phantom."""
    return code_fingerprint_of(*notebook_imports(notebook, root.name), root=root)


# --------------------------------------------------------------------------- checks before a run

# Keys the runner itself reads (the rest go to the notebooks that declare them).
RUNNER_KEYS = {"profile", "run_dir", "figures_dir", "threads", "base", "figure_credit", "last_step"}


def notebook_parameters(path: Path) -> dict[str, Any]:
    """name -> default value of a notebook's `parameters` cell (None where the default is not a literal)."""
    out = {}
    for k, info in pm.inspect_notebook(str(path)).items():
        try:
            out[k] = ast.literal_eval(str(info.get("default")))
        except (ValueError, SyntaxError):
            out[k] = None
    return out


def known_keys(parameters: dict[str, dict[str, Any]]) -> set[str]:
    """Every key a profile may set: the notebooks' parameters, the packaged profiles' keys, the runner's."""
    keys = set(RUNNER_KEYS).union(*(set(p) for p in parameters.values()))
    for f in PROFILE_DIR.glob("*.yaml"):
        keys |= set(load_profile(str(f)))
    return keys


def check_profile(values: dict[str, Any], parameters: dict[str, dict[str, Any]]) -> None:
    """Refuse unknown keys (naming the nearest known one) and values whose type the notebooks' defaults
    do not allow (a boolean must be a boolean, a number a number, a text value text or a number)."""
    known = known_keys(parameters)
    for k in values:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            raise ChainError(f"profile key {k!r} is not a parameter of any notebook"
                             + (f"; did you mean {near[0]!r}?" if near else ""))
    try:
        run_threads(values.get("threads") or 0)
    except ValueError as e:
        raise ChainError(f"profile key threads: {e}") from None
    for stem, params in parameters.items():
        for k, default in params.items():
            if k in AUTO_OR_BOOL and isinstance(values.get(k), bool):
                continue
            problem = _type_problem(default, values[k]) if k in values else None
            if problem:
                raise ChainError(f"profile key {k}: {problem} (as {stem}'s default {default!r})")


# Keys whose default is "auto" and which also take a real boolean (auto | true | false).
AUTO_OR_BOOL = {"data_credentialed"}


def _type_problem(default: Any, value: Any) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{value!r} must be true or false"
    if isinstance(value, bool):
        return f"{value!r} must be {'a number' if isinstance(default, (int, float)) else 'a text value'}"
    if isinstance(default, (int, float)):
        if not isinstance(value, (int, float)):
            return f"{value!r} must be a number"
        if isinstance(default, int) and not float(value).is_integer():
            return f"{value!r} must be a whole number"
        return None
    if isinstance(default, str) and not isinstance(value, (str, int, float)):
        return f"{value!r} must be a text value or a number"
    return None


TEMP_RE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


def remove_temporaries(run_dir: Path) -> int:
    """Delete the temporary files and folders atomic writes leave when a step is killed (`.NAME.XXXX.tmp`)."""
    n = 0
    for root, dirs, files in os.walk(run_dir):
        for d in [d for d in dirs if TEMP_RE.match(d)]:
            shutil.rmtree(Path(root) / d, ignore_errors=True)
            dirs.remove(d)
            n += 1
        for f in files:
            if TEMP_RE.match(f):
                (Path(root) / f).unlink(missing_ok=True)
                n += 1
    return n


class _RunLock:
    """run_dir/.bmj.lock held for the whole run; a second run on the same folder is refused while the first
    is alive, and a lock left by a process that no longer exists is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".bmj.lock"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _lock_pid(self.path)
                if pid and _alive(pid):
                    raise ChainError(f"{self.path.parent}: another bmj reproduce (pid {pid}) is running on this "
                                     "run folder; wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ChainError(f"{self.path}: cannot take the run folder's lock")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
