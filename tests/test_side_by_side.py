"""Independent jobs run side by side (runtime.side_by_side): real worker processes, each at its share of the run's
threads, giving what the same jobs give one after the other; a failing or dying job is named; notebook 05's two
trainings side by side give the models trained one after the other."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bmjlib.model import stages
from bmjlib.runtime import JobFailed, load_profile, side_by_side


def fit(seed: int, hold: float = 0.0) -> dict:
    """A small seeded training; reports where and how it ran."""
    start = time.time()
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3))
    opt = torch.optim.AdamW(net.parameters(), 1e-2)
    x = torch.randn(16, 1, 24, 24)
    for _ in range(20):
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    time.sleep(hold)
    return {"weights": torch.cat([p.detach().flatten() for p in net.parameters()]).numpy(), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "env": os.environ.get("BMJ_THREADS"), "start": start,
            "end": time.time()}


def write_or_fail(path: str, fail: bool) -> str:
    if fail:
        raise ValueError("the sentence column is empty")
    time.sleep(1.0)
    Path(path).write_text("done")
    return path


def die() -> None:
    os._exit(3)


def test_two_jobs_run_at_once_in_one_thread_workers_and_give_the_one_thread_results():
    both = side_by_side({"a": (fit, 0, 3.0), "b": (fit, 1, 3.0)}, threads=2)
    assert list(both) == ["a", "b"]
    a, b = both["a"], both["b"]
    assert os.getpid() not in (a["pid"], b["pid"]) and a["pid"] != b["pid"]
    assert a["start"] < b["end"] and b["start"] < a["end"]  # they overlapped
    assert (a["threads"], a["env"], b["threads"], b["env"]) == (1, "1", 1, "1")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = {"a": fit(0), "b": fit(1)}
    finally:
        torch.set_num_threads(old)
    for k in both:
        np.testing.assert_array_equal(both[k]["weights"], here[k]["weights"])
    assert not np.array_equal(a["weights"], b["weights"])


def test_one_thread_runs_the_jobs_here_one_after_the_other():
    done = side_by_side({"a": (fit, 0), "b": (fit, 1)}, threads=1)
    assert done["a"]["pid"] == done["b"]["pid"] == os.getpid()
    assert done["a"]["end"] <= done["b"]["start"]


def test_a_failing_job_is_named_and_the_others_finish(tmp_path):
    good = tmp_path / "good.txt"
    with pytest.raises(JobFailed, match=r"^job 'bad': ValueError: the sentence column is empty$"):
        side_by_side({"bad": (write_or_fail, str(tmp_path / "bad.txt"), True),
                      "good": (write_or_fail, str(good), False)}, threads=2)
    assert good.read_text() == "done" and not (tmp_path / "bad.txt").exists()


def test_a_job_whose_process_dies_is_named():
    with pytest.raises(JobFailed, match=r"^job 'dies': BrokenProcessPool"):
        side_by_side({"dies": (die,), "fits": (fit, 0)}, threads=2)


HOLDING = """
import os, sys, time
from pathlib import Path
from bmjlib.runtime import side_by_side

def hold(path):
    Path(path).write_text(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    side_by_side({"a": (hold, sys.argv[1] + "/a.pid"), "b": (hold, sys.argv[1] + "/b.pid")}, threads=2)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A killed runner (SIGKILL: no interrupt reaches it) leaves no worker training on for nobody."""
    script = tmp_path / "hold.py"
    script.write_text(HOLDING)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"{n}.pid").is_file() and (tmp_path / f"{n}.pid").read_text() for n in "ab"):
            assert parent.poll() is None and time.time() < deadline, "the workers did not start"
            time.sleep(0.2)
        pids = [int((tmp_path / f"{n}.pid").read_text()) for n in "ab"]
        assert all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if _alive(p)]
    for p in survivors:
        os.kill(p, 9)
    assert not survivors, "a worker outlived its killed parent"


def test_stage2_and_one_stage_side_by_side_equal_the_models_trained_one_after_the_other(smoke_run, tmp_path,
                                                                                        monkeypatch):
    """The smoke chain's notebook 05 trained the two models side by side (`stages.train_stage2_and_one_stage`: two
    workers on a shared latent cache); trained again here one after the other at the workers' thread count, they
    are the same to the bit."""
    run = tmp_path / "run"
    for d in ("00_phantom", "01_cohort", "02_registration", "03_descriptions", "04_stage1"):
        shutil.copytree(smoke_run / d, run / d, symlinks=True)
    threads = json.loads((smoke_run / "chain.json").read_text())["05_stage2"]["threads"]
    monkeypatch.setenv("BMJ_THREADS", str(threads // min(threads, 2)))
    p = load_profile("smoke")
    assert p["one_stage"]
    assert stages.train_stage2(str(run), p) == run / "05_stage2" / "model"
    assert stages.train_one_stage(str(run), p) == run / "05_stage2" / "one_stage" / "model"
    for rel in ("model", "one_stage/model"):
        ours = load_file(run / "05_stage2" / rel / "unet" / "diffusion_pytorch_model.safetensors")
        chain = load_file(smoke_run / "05_stage2" / rel / "unet" / "diffusion_pytorch_model.safetensors")
        assert ours.keys() == chain.keys()
        assert all(torch.equal(ours[k], chain[k]) for k in ours), rel
