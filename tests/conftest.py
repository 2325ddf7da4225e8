import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`-n N`, the README's test command) each of the N workers gets its share of the cores as
    its runs' thread count ($BMJ_THREADS, passed on to every notebook kernel and job worker), so N workers do not
    oversubscribe them. A count set by the caller is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and not os.environ.get("BMJ_THREADS"):
        from bmjlib.runtime import THREADS_ENV, use_run_threads

        os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // workers))
        use_run_threads()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup`: the cells of every notebook run on one worker, in order (each notebook reads the run
    the one before it wrote); the tests that share the session's smoke chain run on one worker, which builds it
    once; every other test runs on the worker of the rest of its file, in the file's order (its module fixtures
    are built once)."""
    for item in items:
        if item.nodeid.startswith("notebooks/"):
            group = "notebooks"
        elif "smoke_run" in getattr(item, "fixturenames", ()):
            group = "smoke_run"
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One whole smoke chain (steps 00-10) per test session, shared by the slow tests that need one: tests that
    only read it first (test_launch), then test_reproducible, which reruns it in place."""
    from bmjlib.chain import run_chain

    return run_chain("smoke", out=tmp_path_factory.mktemp("smoke") / "run", log=lambda *_: None)
