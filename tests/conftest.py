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


# The files whose tests share the session's smoke chain (`smoke_run`): they run on one worker, which builds it once.
SMOKE_CHAIN_FILES = ("tests/test_launch.py", "tests/test_reproducible.py", "tests/test_side_by_side.py")


def worker_scope(nodeid: str) -> str:
    """What runs on one pytest-xdist worker, in collection order: every notebook's cells (each notebook reads the run
    the one before it wrote), the files sharing the smoke chain, and each other test file (its module fixtures are
    built once)."""
    path = nodeid.split("::")[0]
    if path.startswith("notebooks/"):
        return "notebooks"
    return "smoke chain" if path in SMOKE_CHAIN_FILES else path


def pytest_xdist_make_scheduler(config, log):
    # pytest-xdist's own `--dist loadgroup` reads its groups off rewritten node ids, which pytest 9.2 no longer
    # takes (pytest-xdist issue 1386); a scope scheduler with our own scopes does not depend on that.
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ByWorkerScope(config, log)


def pytest_collection_modifyitems(config, items):
    """A test that uses the smoke chain outside SMOKE_CHAIN_FILES would build a second chain on another worker."""
    stray = sorted({i.nodeid.split("::")[0] for i in items if "smoke_run" in getattr(i, "fixturenames", ())
                    and worker_scope(i.nodeid) != "smoke chain"})
    if stray:
        raise pytest.UsageError(f"{', '.join(stray)}: uses the smoke_run fixture; add it to SMOKE_CHAIN_FILES in "
                                "tests/conftest.py")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One whole smoke chain (steps 00-10) per test session, shared by the slow tests that need one: tests that
    only read it first (test_launch), then test_reproducible, which reruns it in place."""
    from bmjlib.chain import run_chain

    return run_chain("smoke", out=tmp_path_factory.mktemp("smoke") / "run", log=lambda *_: None)
