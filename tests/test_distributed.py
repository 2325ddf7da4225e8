"""Training over several processes (paper §5.1: 8 GPUs): the README's `accelerate launch` command on CPU processes
(gloo) trains the model one process trains; gradient accumulation; a killed multi-process run resumes; the
trainer's speed options compute what the default path computes; checkpoints never unpickle."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

import bmjlib.model.train as T
from bmjlib.model import launch, stages
from bmjlib.runtime import load_profile

import test_train
from test_train import CFG, make_table

parts = test_train.parts  # the fixture of a tiny VAE, text encoder and image table

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
# 9 stage-1 images (7 train + 2 val), global batch 8: each epoch's second step holds 1 example, fewer than
# two processes (or two micro-batches), so one part of it has no example
PROFILE = "base: smoke\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 2\ncheckpoint_every: 2\nvae_steps: 2\nclip_epochs: 1\n"
UNET = "04_stage1/model/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A run folder after step 03 with notebook 04's frozen components already trained: 01_cohort/stage1.csv,
    04_stage1/{vae, text_encoder}. Each test trains stage 1 in a copy."""
    d = tmp_path_factory.mktemp("dist")
    table = make_table(d / "img", 9)
    table.loc[7:, "split"] = "val"
    (d / "run" / "01_cohort").mkdir(parents=True)
    table.to_csv(d / "run" / "01_cohort" / "stage1.csv", index=False)
    (d / "tiny.yaml").write_text(PROFILE)
    stages.stage1_components(str(d / "run"), load_profile(str(d / "tiny.yaml")))
    return d


def _copy(cohort, name) -> Path:
    run = cohort / name
    shutil.copytree(cohort / "run", run)
    return run


def _env(debug: Path | None = None, **extra) -> dict:
    env = dict(os.environ, BMJ_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop(T.DEBUG_ENV, None)
    if debug is not None:
        env[T.DEBUG_ENV] = str(debug)
    return env


def _port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(cohort, run, processes=2, script=None, extra=(), debug=None, **popen):
    """`accelerate launch --multi_gpu --num_processes N -m bmjlib.model.launch --profile ... --run ... --stage 1`,
    the README's command (on a machine without GPUs each process trains on the CPU, over gloo)."""
    what = [str(script)] if script else ["-m", "bmjlib.model.launch"]
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _port(), *extra, *what,
           "--profile", str(cohort / "tiny.yaml"), "--run", str(run), "--stage", "1"]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(debug), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def _finish(proc, timeout=600) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _draws(folder: Path) -> dict:
    """{(step, global example index): [the numbers drawn for it, draw by draw]} from the debug logs of every rank."""
    per = {}
    for f in sorted(folder.glob("draws-rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            for j, s in enumerate(r["samples"]):
                per[(r["step"], s)] = [np.asarray(d["values"]).reshape(d["shape"])[j].tolist() for d in r["draws"]]
    return per


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(folder.glob("draws-rank*.jsonl")) for x in f.read_text().splitlines()]


def assert_same_model(a: Path, b: Path):
    """Two trained stage-1 models are the same to float tolerance: fewer than 0.01 % of the weights differ by more
    than 1e-5 (each step moves a weight by ~lr = 1e-4), and the difference is under 0.2 % of how far training
    moved the weights. (AdamW turns float noise in a near-zero gradient, e.g. a bias before a normalisation,
    into an update of a fraction of lr, so single weights may differ by that much.)"""
    wa, wb = load_file(a / UNET), load_file(b / UNET)
    info = json.loads((a / "04_stage1" / "train.json").read_text())["config"]
    torch.manual_seed(info["seed"])
    init = T.init_pipeline(None, a / "04_stage1" / "vae", f"local-dir:{a / '04_stage1' / 'text_encoder'}",
                           info["unet_config"], info["image_size"]).unet.state_dict()
    assert wa.keys() == wb.keys()
    off = sum(int(((wa[k] - wb[k]).abs() > 1e-5).sum()) for k in wa)
    assert off < 1e-4 * sum(v.numel() for v in wa.values()), off
    moved = sum(float((wa[k] - init[k]).pow(2).sum()) for k in wa) ** 0.5
    diff = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    assert moved > 0.01 and diff < 2e-3 * moved, (diff, moved)
    la, lb = (pd.read_csv(r / "04_stage1" / "loss.csv") for r in (a, b))
    assert list(la["step"]) == list(lb["step"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """Stage 1 in one process (as notebook 04 trains it), with the draws logged: the model the others must equal."""
    run = _copy(cohort, "one")
    os.environ[T.DEBUG_ENV] = str(run / "debug")
    try:
        launch.stage1(str(run), load_profile(str(cohort / "tiny.yaml")))
    finally:
        os.environ.pop(T.DEBUG_ENV)
    return run


@pytest.mark.slow
def test_two_processes_train_the_one_process_model(cohort, reference):
    run = _copy(cohort, "two")
    out = _finish(_launch(cohort, run, debug=run / "debug"))
    # (a) it finishes; stage 1 trained on the train and validation images (the paper's p10-p18 count)
    assert "04_stage1: 4 steps this run" in out and "2 process(es)" in out, out[-3000:]
    info = json.loads((run / "04_stage1" / "train.json").read_text())
    assert info["examples"] == 9 and info["steps"] == 4
    # the same model identity as the one-process run: notebook 04 would find it up to date
    assert info["key"] == json.loads((reference / "04_stage1" / "train.json").read_text())["key"]
    recs = _records(run / "debug")
    assert {r["rank"] for r in recs} == {0, 1} and all(r["world"] == 2 for r in recs)
    # (b) the ranks draw different timesteps and noise in the full steps (0 and 2: 4 examples each)
    for step in (0, 2):
        r0, r1 = (next(r for r in recs if r["step"] == step and r["rank"] == k) for k in (0, 1))
        assert len(r0["samples"]) == len(r1["samples"]) == 4 and not set(r0["samples"]) & set(r1["samples"])
        d0, d1 = ({d["draw"] + str(len(d["shape"])): d["values"] for d in r["draws"]} for r in (r0, r1))
        assert d0["randn4"] != d1["randn4"] and d0["randint1"] != d1["randint1"]  # noise, timesteps
    # (d) an epoch's last batch holds one example: rank 1 runs example 0 at weight 0 and finishes with rank 0
    for step in (1, 3):
        r1 = next(r for r in recs if r["step"] == step and r["rank"] == 1)
        assert r1["samples"] == [] and r1["share"] == 0.0
    # (c) every example drew exactly what it drew in one process, and the weights are the same
    one, two = _draws(reference / "debug"), _draws(run / "debug")
    assert one.keys() == two.keys() and len(one) == 2 * (8 + 1)
    for k in one:
        assert one[k] == two[k], k
    assert_same_model(reference, run)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_full_batch(cohort, reference, monkeypatch):
    """1 process x 2 micro-batches of 4 (`accelerate launch --gradient_accumulation_steps 2` sets this variable)
    = 1 process x batch 8; the launch setting does not change the model's identity (its key)."""
    run = _copy(cohort, "accum")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    monkeypatch.setenv(T.DEBUG_ENV, str(run / "debug"))
    launch.stage1(str(run), load_profile(str(cohort / "tiny.yaml")))
    recs = _records(run / "debug")
    assert [(r["step"], r["micro"], len(r["samples"])) for r in recs] == [
        (0, 0, 4), (0, 1, 4), (1, 0, 1), (1, 1, 0), (2, 0, 4), (2, 1, 4), (3, 0, 1), (3, 1, 0)]
    assert _draws(run / "debug") == _draws(reference / "debug")
    a, b = (json.loads((r / "04_stage1" / "train.json").read_text()) for r in (reference, run))
    assert a["key"] == b["key"]
    assert_same_model(reference, run)


RUNNER = textwrap.dedent("""
    import sys, time
    import bmjlib.model.train as T
    from bmjlib.model import launch
    orig = T.diffusion_loss
    def paced(*a, **k):  # slow enough to be killed between checkpoints
        time.sleep(1.0)
        return orig(*a, **k)
    T.diffusion_loss = paced
    sys.exit(launch.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_model(cohort, reference, tmp_path):
    run = _copy(cohort, "killed")
    script = tmp_path / "paced.py"
    script.write_text(RUNNER)
    proc = _launch(cohort, run, script=script)
    ckpt = run / "04_stage1" / "checkpoints"
    deadline = time.time() + 400
    while not T.complete_checkpoints(ckpt):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    # the launcher and both training processes (torch's launcher starts them in sessions of their own)
    for pid in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "04_stage1" / "model").exists()
    (good,) = T.complete_checkpoints(ckpt)
    assert T.checkpoint_state(good)["step"] == 2 and T.checkpoint_state(good)["processes"] == 2
    names = sorted(p.name for p in good.iterdir())
    # accelerate's state (both models, the optimizer, each process's RNG) + ours; no pickled custom objects
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl",
            "random_states_1.pkl", T.STATE_FILE, T.SEAL_FILE} <= set(names), names
    assert not [n for n in names if n.startswith("custom_checkpoint")]
    out = _finish(_launch(cohort, run))
    assert f"resumed from {good.name} (step 2 of 4)" in out, out[-3000:]
    assert "04_stage1: 2 steps this run" in out
    assert_same_model(reference, run)


# ----------------------------------------------------------------------------- the per-example draws

def test_split_draws_are_rows_of_the_whole_batch():
    whole = torch.Generator().manual_seed(7)
    ref = (torch.rand(6, generator=whole), torch.randint(0, 3, (6, 2), generator=whole),
           torch.randn((6, 4, 2, 2), generator=whole), torch.randint(9, size=(6,), generator=whole))
    got = [[], [], [], []]
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        g = torch.Generator().manual_seed(7)
        rec = []
        with T._BatchDraws(g, lo, hi, 6, rec):
            parts = (torch.rand(hi - lo, generator=g), torch.randint(0, 3, (hi - lo, 2), generator=g),
                     torch.randn(torch.Size([hi - lo, 4, 2, 2]), generator=g),
                     torch.randint(9, size=(hi - lo,), generator=g))
            torch.rand(5)  # draws from the global generator pass untouched
        for acc, p in zip(got, parts):
            acc.append(p)
        assert [r["shape"][0] for r in rec] == [hi - lo] * 4
    for r, parts in zip(ref, got):
        torch.testing.assert_close(torch.cat(parts), r, rtol=0, atol=0)
    g = torch.Generator().manual_seed(7)
    with T._BatchDraws(g, 0, 2, 6), pytest.raises(RuntimeError, match=r"shape \[3\] .* not one row per example"):
        torch.rand(3, generator=g)
    with T._BatchDraws(g, 0, 2, 6), pytest.raises(RuntimeError, match="normal_ with the step's generator"):
        torch.empty(2).normal_(generator=g)


# ----------------------------------------------------------------------------- speed options of the real trainer

@pytest.fixture(scope="module")
def default_run(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("opts")
    T.train_stage(dict(CFG, max_steps=2, checkpoint_every=0), parts["table"], out / "default", vae=parts["vae"],
                  text_encoder=parts["text_encoder"], cache_dir=out / "latents", progress=False)
    return out


@pytest.mark.parametrize("option,rtol", [
    (dict(attention="classic"), 1e-5), (dict(channels_last=True), 1e-5), (dict(fused_adamw=False), 1e-5),
    (dict(compile="eager"), 1e-5), (dict(mixed_precision="bf16"), 3e-2)])
def test_speed_option_gives_the_default_loss(option, rtol, parts, default_run):
    """Each option `bmj bench --gpu` compares, run by the real trainer on the CPU: the same losses as the default
    path (bf16 to its precision), and the same key, so the model counts as the same."""
    name = "-".join(f"{k}={v}" for k, v in option.items())
    T.train_stage(dict(CFG, max_steps=2, checkpoint_every=0, **option), parts["table"], default_run / name,
                  vae=parts["vae"], text_encoder=parts["text_encoder"], cache_dir=default_run / "latents",
                  progress=False)
    la, lb = (pd.read_csv(default_run / d / "loss.csv") for d in ("default", name))
    assert list(la["step"]) == list(lb["step"]) == [1, 2]
    np.testing.assert_allclose(lb["loss"], la["loss"], rtol=rtol)
    ka, kb = (json.loads((default_run / d / "train.json").read_text()) for d in ("default", name))
    assert kb["config"][next(iter(option))] == next(iter(option.values()))
    # how a step runs is not part of the model's identity; its precision is
    assert (ka["key"] == kb["key"]) == ("mixed_precision" not in option)


def test_bad_options_are_refused_with_one_line(parts, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision 'fp16' needs a CUDA GPU"):
        T.make_accelerator(T.TrainConfig(mixed_precision="fp16"), cpu=True)
    with pytest.raises(ValueError, match="grad_accum_steps: -1 is not a whole number"):
        T.make_accelerator(T.TrainConfig(grad_accum_steps=-1), cpu=True)
    for bad, msg in ((dict(attention="flash"), "attention: 'flash' is not one of sdpa, classic"),
                     (dict(compile="fast"), "compile: 'fast' is not a torch.compile backend")):
        with pytest.raises(ValueError, match=msg):
            T.train_stage(dict(CFG, max_steps=1, **bad), parts["table"], tmp_path / "x", vae=parts["vae"],
                          text_encoder=parts["text_encoder"], progress=False)


# ----------------------------------------------------------------------------- nothing unpickled from a run folder

def test_every_torch_load_in_bmjlib_is_weights_only():
    calls = []
    for f in sorted((ROOT / "bmjlib").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.relative_to(ROOT), text[m.start():i]))
    assert calls, "no torch.load found: the search is broken"
    bad = [(f, c) for f, c in calls if "weights_only=True" not in c]
    assert not bad, bad


@pytest.mark.slow
def test_gpu_benchmark_times_the_trainers_step(monkeypatch):
    """`bmj bench --gpu` times `Trainer.step` itself (run here on the CPU with a miniature of the paper's parts)."""
    from bmjlib.bench.core import BenchConfig
    from bmjlib.bench.gpu import ARMS, gpu_rows, tiny_configs

    calls, orig = [], T.Trainer.step

    def counted(self, k):
        calls.append((self.cfg.attention, self.cfg.mixed_precision, k))
        return orig(self, k)
    monkeypatch.setattr(T.Trainer, "step", counted)
    cfg = BenchConfig(gpu_size=32, gpu_batch=2, gpu_steps=3, gpu_sample_steps=1)
    rows = gpu_rows(cfg, True, device="cpu", configs=tiny_configs(), arms=[ARMS[0]])
    assert rows[0].available and np.isfinite(rows[0].extra["loss"]), rows[0].note
    assert calls == [("classic", "no", k) for k in range(2 + 3)]  # 2 warm-up steps, then the timed ones
