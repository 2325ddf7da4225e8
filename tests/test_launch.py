"""`python -m bmjlib.model.launch` (multi-GPU training outside Jupyter) makes exactly the notebooks' calls."""
import pytest

from bmjlib.model import launch
from bmjlib.chain import load_profile, run_chain


@pytest.mark.slow
def test_launch_finds_the_notebooks_models_up_to_date(tmp_path, capsys):
    run = tmp_path / "run"
    run_chain("smoke", out=run, stop=5, log=lambda *_: None)
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("0[45]_*/**/train.json")}
    assert len(stamps) == 3  # stage 1, stage 2, one-stage
    p = load_profile("smoke")
    capsys.readouterr()
    assert launch.stage1(str(run), p) == run / "04_stage1" / "model"
    assert launch.stage2(str(run), p) == [run / "05_stage2" / "model", run / "05_stage2" / "one_stage" / "model"]
    out = capsys.readouterr().out
    assert out.count("is up to date") == 3, out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a launched stage retrained what the notebook made"
