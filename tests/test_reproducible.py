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
def test_a_finished_run_reruns_nothing(smoke_run):
    """Asked again with nothing changed, the chain skips every step: no step writes into an earlier step's folder
    (the training latents that stages 1-2 and the ablation arms encode live in the run's cache/, no step's output)."""
    lines = []
    run_chain("smoke", out=smoke_run, log=lines.append)
    assert not [line for line in lines if ": running" in line], lines
    assert sum(": up to date" in line for line in lines) == 11
    assert any((smoke_run / "cache" / "latents").glob("dataset-*.safetensors"))
    assert not (smoke_run / "04_stage1" / "latents").exists()


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
