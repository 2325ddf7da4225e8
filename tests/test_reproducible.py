"""Two runs of the smoke chain with one profile, on one machine, write byte-identical step outputs: the thread
count is a recorded run setting, wall-clock times go to logs/, archives are built in memory (bmjlib.chain,
bmjlib.runtime). Slow: the whole smoke chain, twice."""
from __future__ import annotations

from pathlib import Path

import pytest

from bmjlib.chain import run_chain
from bmjlib.io import sha256_file


def outputs(run: Path) -> dict[str, str]:
    """sha256 of every file a step wrote: the NN_* folders and the figures (not the executed notebooks, the
    logs or the runner's own state, which record when and how long)."""
    files = [f for d in run.iterdir() if d.is_dir() and (d.name[:2].isdigit() or d.name == "figures")
             for f in d.rglob("*") if f.is_file()]
    return {str(f.relative_to(run)): sha256_file(f) for f in files}


@pytest.mark.slow
def test_two_smoke_runs_write_identical_outputs(smoke_run):
    run = smoke_run
    first = outputs(run)
    run_chain("smoke", out=run, force=True, log=lambda *_: None)
    second = outputs(run)
    assert set(first) == set(second)
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, f"{len(differ)} of {len(first)} files differ, e.g. {differ[:10]}"
    assert len(first) > 500 and (run / "logs" / "timings.jsonl").is_file()
