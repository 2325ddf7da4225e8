"""Where a run lives and how it uses the machine: profiles, paths from notebook parameters, step folders,
CPU threads, independent jobs run side by side.

Notebooks run with their own folder as cwd under JupyterLab and nbval but inside the run folder under
papermill (DESIGN "The chain"), so every path a notebook or the library takes from a parameter is resolved
here against the repository root.
"""
from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Mapping

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


class ProfileError(ValueError):
    """A profile cannot be used as written (the message names the profile and the problem)."""


def load_profile(name_or_file: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a profile: a packaged name (smoke, demo, paper) or a YAML file of flat values.

    A profile file may say `base: demo` (or another file) to start from that profile and override a few
    values; a chain of bases that comes back to itself is refused.
    """
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"profile file {p} does not exist")
        ident, name, text = str(p.resolve()), p.stem, p.read_text()
    else:
        packaged = PROFILE_DIR / f"{name_or_file}.yaml"
        if not packaged.exists():
            names = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no profile named {name_or_file!r} (packaged: {names}; or give a .yaml file)")
        ident, name, text = str(packaged.resolve()), str(name_or_file), packaged.read_text()
    if ident in _seen:
        raise ProfileError(f"profile {name}: its base: chain comes back to itself "
                           f"({' -> '.join(Path(x).stem for x in _seen + (ident,))})")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"profile {name}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ProfileError(f"profile {name}: expected a mapping of name: value, got {type(values).__name__}")
    base = values.pop("base", None)
    merged = load_profile(str(base), _seen + (ident,)) if base else {}
    merged.update(values)
    merged["profile"] = values.get("profile", name)
    return merged


def packaged_name(profile: str | os.PathLike | dict) -> str | None:
    """The packaged profile `profile` names (smoke, demo, paper, ...): a packaged name as `load_profile` reads it,
    or the path of a file in PROFILE_DIR itself; None for a user's file (a copy, or `base: demo` plus edits) or
    a dict of values."""
    if isinstance(profile, dict):
        return None
    p = Path(os.path.expanduser(str(profile)))
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p.stem if p.is_file() and p.resolve().parent == PROFILE_DIR.resolve() else None
    return str(profile) if (PROFILE_DIR / f"{profile}.yaml").is_file() else None


# The profiles whose relative `figures_dir` is the repository's own: the demo chain writes the committed figures/.
REPOSITORY_FIGURES = ("demo",)


def figures_dir_for(profile: str | os.PathLike | dict, figures_dir: str | os.PathLike | None,
                    run_dir: str | os.PathLike) -> Path:
    """Where a run writes its figures and tables (the chain's rule for the profile key `figures_dir`):

    - empty: <run folder>/figures;
    - absolute: that folder, whatever the profile;
    - relative: inside the run folder (<run>/<figures_dir>), except for the packaged demo profile itself (by
      name, REPOSITORY_FIGURES), whose `figures_dir: figures` is the repository's figures/. So a copy of the
      demo profile, or `base: demo` plus edits, never overwrites the committed figures.
    """
    run = Path(os.path.expanduser(str(run_dir))).resolve()
    if not figures_dir:
        return run / "figures"
    p = Path(os.path.expanduser(str(figures_dir)))
    if p.is_absolute():
        return p.resolve()
    base = repo_root() if packaged_name(profile) in REPOSITORY_FIGURES else run
    return (base / p).resolve()


# The run's intra-op thread count: a recorded setting of the run (profile `threads`, 0 = the machine's cores),
# passed by the chain to every notebook kernel through this variable. Never chosen from the machine's load:
# float reductions then differ from run to run.
THREADS_ENV = "BMJ_THREADS"


def run_threads(threads: int | str | None = None) -> int:
    """The thread count a run uses: `threads` if > 0, else $BMJ_THREADS, else the machine's cores."""
    for v in (threads, os.environ.get(THREADS_ENV)):
        try:
            n = int(v) if v not in (None, "") else 0
        except (TypeError, ValueError):
            raise ProfileError(f"threads {v!r}: a whole number of threads (0 = every core)") from None
        if n > 0:
            return n
    return os.cpu_count() or 1


def use_run_threads() -> int:
    """Set torch's intra-op threads to the run's recorded count (`run_threads`); returns it."""
    n = run_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# Wall-clock times are logs, not results: they go to the run's logs/timings.jsonl (the chain names the file
# in this variable), never into a step's outputs, so two runs of a step write byte-identical outputs.
TIMINGS_ENV = "BMJ_TIMINGS"
STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # local time of timing lines and of chain.json's "finished"


def record_timing(what: str, seconds: float, **extra) -> None:
    """Append one timing line ({what, seconds, ...}) to $BMJ_TIMINGS; nothing when no run names one."""
    f = os.environ.get(TIMINGS_ENV)
    if not f:
        return
    row = {"what": what, "seconds": round(float(seconds), 3), **extra, "at": time.strftime(STAMP_FORMAT)}
    with open(f, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


class JobFailed(RuntimeError):
    """A job of `side_by_side` raised or its process died; the message names the job."""


def _start_worker(threads: int) -> None:
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)
    threading.Thread(target=_end_with_parent, args=(multiprocessing.parent_process(),), daemon=True).start()


def _end_with_parent(parent) -> None:
    """A worker whose parent is gone (killed, not interrupted: its kernel shut down, `kill` on the runner) ends at
    once instead of finishing its job: nobody reads the result, and a new run may already write the same folder."""
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def side_by_side(jobs: Mapping[str, tuple], threads: int | None = None) -> dict[str, Any]:
    """Run independent jobs at once: {name: (function, *args)} -> {name: function(*args)}.

    On a machine without a GPU, with the run's N threads (`run_threads`), min(N, len(jobs)) worker processes
    run the jobs, each at N // workers threads, starting them in the order given (put the longest first). The
    demo's small models use a second thread poorly (a 64 px UNet trains 1.4x faster on two threads than on one)
    while two one-thread jobs run at once as fast as one alone, so two trainings side by side take about 0.7 of
    their time one after the other. Every job runs at the same thread count however the jobs fall on the workers,
    so its result does not depend on which finishes first; with one thread, or on a GPU, the jobs run here one
    after the other. Functions must be importable (module level), and jobs must not write what another reads or
    writes while they run (encode a shared latent cache before). Workers are started by Python's "spawn" method
    (a fresh interpreter, safe beside torch's threads and Jupyter's), which imports the main script: a script
    calling this needs the usual `if __name__ == "__main__":` guard. A failing job does not stop the others: once
    they have ended, JobFailed names it (and any other); an interrupt stops every worker (each job resumes from
    its own checkpoints on the next run), and so does the death of this process: each worker watches it and ends.
    """
    n = run_threads(threads)
    workers = min(n, len(jobs))
    if workers <= 1 or torch.cuda.is_available():
        return {name: fn(*args) for name, (fn, *args) in jobs.items()}
    each = n // workers
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited torch threads or CUDA state
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(each,))
    futures = {}
    try:
        futures = {pool.submit(fn, *args): name for name, (fn, *args) in jobs.items()}
        wait(futures)
    except BaseException:  # an interrupt: stop the workers now rather than after their jobs
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in set(multiprocessing.active_children()) - before:
            proc.terminate()
        raise
    pool.shutdown()
    failed = [(name, f.exception()) for f, name in futures.items() if f.exception() is not None]
    if failed:
        name, err = failed[0]
        also = f" (also failed: {', '.join(repr(n) for n, _ in failed[1:])})" if len(failed) > 1 else ""
        why = (" (a worker died: killed, out of memory, or it could not start; a script that runs the chain's "
               "functions needs `if __name__ == \"__main__\":` around its code, as worker processes import it)"
               if isinstance(err, BrokenProcessPool) else "")
        raise JobFailed(f"job {name!r}: {type(err).__name__}: {err}{also}{why}") from err
    return {name: f.result() for f, name in futures.items()}
