import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One whole smoke chain (steps 00-10) per test session, shared by the slow tests that need one: tests that
    only read it first (test_launch), then test_reproducible, which reruns it in place."""
    from bmjlib.chain import run_chain

    return run_chain("smoke", out=tmp_path_factory.mktemp("smoke") / "run", log=lambda *_: None)
