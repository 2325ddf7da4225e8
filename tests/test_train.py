"""Training: cache + augmentation, stage 1 -> stage 2, rerun no-op, kill/resume, torn checkpoints, NaN handling."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import bmjlib.model.train as T
from bmjlib.io import atomic_write_png, sha256_file
from bmjlib.model.latents import build_cache, swap_laterality
from bmjlib.model.pipeline import BiomedJourneyPipeline

from test_pipeline import TINY_UNET, tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
CFG = dict(image_size=32, batch_size=4, unet_config=TINY_UNET, checkpoint_every=2, keep_checkpoints=2)


def make_table(folder: Path, n=10) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        side = ["left", "right"][i % 2]
        img = np.full((36, 36), 60, np.uint8)
        img[18:32, (20 if side == "left" else 4):(32 if side == "left" else 16)] = 210
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        prior = np.full((36, 36), 60, np.uint8) + rng.integers(0, 20, (36, 36)).astype(np.uint8)
        atomic_write_png(folder / f"f{i}.png", img)
        atomic_write_png(folder / f"p{i}.png", prior)
        rows.append({"image_path": str(folder / f"f{i}.png"), "impression": f"{side} pleural effusion",
                     "split": "train", "subject_id": str(i), "prior_path": str(folder / f"p{i}.png"),
                     "registered_path": str(folder / f"f{i}.png"), "followup_path": str(folder / f"f{i}.png"),
                     "description": f"new {side} pleural effusion"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    pipe = tiny_pipeline()
    pipe.vae.save_pretrained(d / "vae")
    pipe.text_encoder.save(d / "text_encoder")
    return {"vae": str(d / "vae"), "text_encoder": f"local-dir:{d / 'text_encoder'}", "table": make_table(d / "img")}


def test_swap_laterality():
    assert swap_laterality("New Left effusion; right PTX unchanged, LEFT") == "New Right effusion; left PTX unchanged, RIGHT"
    assert swap_laterality("leftover bright") == "leftover bright"


def test_cache_augmentation_is_identical_for_prior_and_target(tmp_path, parts):
    pipe = tiny_pipeline()
    tab = parts["table"]
    rows = T.stage_rows(tab.assign(prior_path=tab["registered_path"]), "registered", "description")
    data = build_cache(pipe, rows, tmp_path / "cache", 32, margin=1, dummy_prior=False, progress=False)
    f = pipe.latent_factor
    side = (32 + 2 * f) // f  # encoded at image_size + 2 x margin latent px, both orientations
    assert data.target.shape == (10, 2, 4, side, side)
    g = torch.Generator().manual_seed(0)
    b = data.batch(torch.arange(10), g, hflip=True, device="cpu")
    assert b["target"].shape == (10, 4, side - 2, side - 2)
    # same image -> same flip and crop (the prior's latent is unscaled, InstructPix2Pix; both stored as fp16)
    torch.testing.assert_close(b["prior"] * pipe.vae.config.scaling_factor, b["target"], rtol=2e-3, atol=1e-3)
    # flipped samples get the sentence with left/right swapped
    g = torch.Generator().manual_seed(0)
    flip = (torch.rand(10, generator=g) < 0.5).long()
    texts = [swap_laterality(t) if f else t for t, f in zip(rows["text"], flip.tolist())]
    torch.testing.assert_close(b["text"], pipe.text_states(texts).float(), atol=1e-2, rtol=1e-2)
    assert 0 < int(flip.sum()) < 10
    # the cache is reused: nothing is encoded a second time
    calls = []
    orig = BiomedJourneyPipeline.encode_images
    BiomedJourneyPipeline.encode_images = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        build_cache(pipe, rows, tmp_path / "cache", 32, margin=1, dummy_prior=False, progress=False)
    finally:
        BiomedJourneyPipeline.encode_images = orig
    assert calls == []


def test_unreadable_image_is_skipped_and_counted(tmp_path, parts):
    tab = parts["table"].copy()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    tab.loc[3, "image_path"] = str(bad)
    rows = T.stage_rows(tab, "dummy", "impression")
    data = build_cache(tiny_pipeline(), rows, tmp_path / "c", 32, 1, dummy_prior=True, progress=False)
    assert len(data) == 9 and data.skipped == 1


def test_stage1_then_stage2_and_rerun_is_noop(tmp_path, parts, capsys):
    tab = parts["table"]
    m1 = T.train_stage(dict(CFG, max_steps=3), tab, tmp_path / "s1", vae=parts["vae"],
                       text_encoder=parts["text_encoder"], progress=False)
    info = json.loads((tmp_path / "s1" / "train.json").read_text())
    assert info["steps"] == 3 and info["prior"] == "dummy" and info["examples"] == 10
    assert not (tmp_path / "s1" / "checkpoints").exists()
    loss = pd.read_csv(tmp_path / "s1" / "loss.csv")
    assert list(loss["step"]) == [1, 2, 3] and np.isfinite(loss["loss"]).all()
    m2 = T.train_stage(dict(CFG, max_steps=2, ema=True), tab, tmp_path / "s2", init_from=m1, prior="registered",
                       text_column="description", cache_dir=tmp_path / "s1" / "latents", progress=False)
    # stage 2 continues stage 1's UNet; train.json records that one, not a config argument it did not use
    wide = dict(CFG, max_steps=1, unet_config=dict(TINY_UNET, block_out_channels=[32, 32]))
    T.train_stage(wide, tab, tmp_path / "s2w", init_from=m1, prior="registered", text_column="description",
                  cache_dir=tmp_path / "s1" / "latents", progress=False)
    rec = json.loads((tmp_path / "s2w" / "train.json").read_text())["config"]["unet_config"]
    assert rec["block_out_channels"] == [16, 32] == list(BiomedJourneyPipeline.from_pretrained(m1).unet.config.block_out_channels)
    a = BiomedJourneyPipeline.from_pretrained(m1).unet.conv_in.weight
    b = BiomedJourneyPipeline.from_pretrained(m2).unet.conv_in.weight
    assert 0 < (a - b).abs().max() < 0.1  # continued from stage 1, and changed
    before = (tmp_path / "s2" / "train.json").read_text()
    capsys.readouterr()
    T.train_stage(dict(CFG, max_steps=2, ema=True), tab, tmp_path / "s2", init_from=m1, prior="registered",
                  text_column="description", progress=False)
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "s2" / "train.json").read_text() == before
    with pytest.raises(KeyError, match="registered_path"):
        T.train_stage(CFG, tab.drop(columns="registered_path"), tmp_path / "s3", init_from=m1, prior="registered")
    with pytest.raises(ValueError, match="unknown training option"):
        T.train_stage(dict(CFG, learning_rate=1), tab, tmp_path / "s3", init_from=m1)


def test_new_pixels_under_the_same_paths_or_new_training_code_train_again(tmp_path, parts, capsys, monkeypatch):
    # a rerun of registration rewrites the images under the same names: the model is keyed on their contents
    tab = make_table(tmp_path / "img")
    cfg = dict(CFG, max_steps=1)
    T.train_stage(cfg, tab, tmp_path / "s1", vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    capsys.readouterr()
    T.train_stage(cfg, tab, tmp_path / "s1", vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    assert "up to date" in capsys.readouterr().out
    first = json.loads((tmp_path / "s1" / "train.json").read_text())["key"]
    img = np.full((36, 36), 90, np.uint8)
    atomic_write_png(tab["image_path"][3], img)
    T.train_stage(cfg, tab, tmp_path / "s1", vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    assert "up to date" not in capsys.readouterr().out
    second = json.loads((tmp_path / "s1" / "train.json").read_text())["key"]
    assert second != first
    # the same data and settings, other training code
    real = T.code_fingerprint_of
    monkeypatch.setattr(T, "code_fingerprint_of", lambda *m: real(*m) + "-edited")
    T.train_stage(cfg, tab, tmp_path / "s1", vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((tmp_path / "s1" / "train.json").read_text())["key"] not in (first, second)


def test_a_new_decoder_keeps_the_trained_unets(tmp_path, parts, capsys):
    # the UNets learn in the encoder's latent space: a VAE whose decoder alone changed leaves both stages trained,
    # and each model takes the new decoder; a changed encoder trains them again
    tab = parts["table"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"

    def both(vae):
        m1 = T.train_stage(dict(CFG, max_steps=2), tab, s1, vae=vae, text_encoder=parts["text_encoder"],
                           progress=False)
        T.train_stage(dict(CFG, max_steps=2), tab, s2, init_from=m1, prior="registered", text_column="description",
                      cache_dir=s1 / "latents", progress=False)

    both(parts["vae"])
    runs = [(s / "train.json").read_text() for s in (s1, s2)]
    unets = [sha256_file(s / "model" / "unet" / UNET_WEIGHTS) for s in (s1, s2)]
    latents = sorted(p.name for p in (s1 / "latents").iterdir())
    vae = BiomedJourneyPipeline.from_pretrained(s1 / "model").vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    vae.save_pretrained(tmp_path / "vae_new_decoder")
    capsys.readouterr()
    both(tmp_path / "vae_new_decoder")
    out = capsys.readouterr().out
    assert out.count("vae/ replaced, the UNet kept") == 2 and out.count("up to date") == 2
    assert [(s / "train.json").read_text() for s in (s1, s2)] == runs
    assert [sha256_file(s / "model" / "unet" / UNET_WEIGHTS) for s in (s1, s2)] == unets
    assert sorted(p.name for p in (s1 / "latents").iterdir()) == latents  # nothing encoded again
    for s in (s1, s2):
        saved = BiomedJourneyPipeline.from_pretrained(s / "model").vae
        assert torch.equal(saved.decoder.conv_out.bias, vae.decoder.conv_out.bias)
        assert torch.equal(saved.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    both(tmp_path / "vae_new_decoder")  # and then a plain no-op
    assert "replaced" not in capsys.readouterr().out
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.5)
    vae.save_pretrained(tmp_path / "vae_new_encoder")
    both(tmp_path / "vae_new_encoder")
    assert "up to date" not in capsys.readouterr().out
    assert [sha256_file(s / "model" / "unet" / UNET_WEIGHTS) for s in (s1, s2)] != unets


def _nan_at(monkeypatch, steps, weights_at=None):
    orig, count = T.diffusion_loss, {"n": 0}

    def patched(unet, proj, *a, **k):
        count["n"] += 1
        loss = orig(unet, proj, *a, **k)
        if weights_at is not None and count["n"] == weights_at:
            with torch.no_grad():
                proj.weight[0, 0] = float("nan")
        return loss * float("nan") if count["n"] in steps else loss
    monkeypatch.setattr(T, "diffusion_loss", patched)


def test_nan_loss_skips_step(tmp_path, parts, monkeypatch):
    _nan_at(monkeypatch, {2, 4})
    m = T.train_stage(dict(CFG, max_steps=5, checkpoint_every=0), parts["table"], tmp_path / "o",
                      vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    info = json.loads((tmp_path / "o" / "train.json").read_text())
    assert info["steps"] == 5 and info["skipped_steps"] == 2
    assert list(pd.read_csv(tmp_path / "o" / "loss.csv")["step"]) == [1, 3, 5]
    pipe = BiomedJourneyPipeline.from_pretrained(m)
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_nan_streak_aborts_without_saving(tmp_path, parts, monkeypatch):
    _nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(T.TrainingDiverged, match="3 consecutive non-finite steps"):
        T.train_stage(dict(CFG, max_steps=20, max_bad_steps=3), parts["table"], tmp_path / "o",
                      vae=parts["vae"], text_encoder=parts["text_encoder"], progress=False)
    assert not (tmp_path / "o" / "model").exists()
    ckpts = T.complete_checkpoints(tmp_path / "o" / "checkpoints")
    assert [T.checkpoint_state(c)["step"] for c in ckpts] == [2, 4]  # taken while the streak ran
    for c in ckpts:
        unet = load_file(c / "model.safetensors")  # accelerate's first model: the UNet
        assert "conv_in.weight" in unet and all(torch.isfinite(v).all() for v in unet.values())


def test_nan_weights_never_saved(tmp_path, parts, monkeypatch):
    _nan_at(monkeypatch, set(), weights_at=3)  # weights turn NaN during step 3, before the step-4 checkpoint
    with pytest.raises(T.TrainingDiverged, match="non-finite weights at step 4"):
        T.train_stage(dict(CFG, max_steps=8), parts["table"], tmp_path / "o", vae=parts["vae"],
                      text_encoder=parts["text_encoder"], progress=False)
    assert [T.checkpoint_state(c)["step"] for c in T.complete_checkpoints(tmp_path / "o" / "checkpoints")] == [2]
    assert not (tmp_path / "o" / "model").exists()


RUNNER = textwrap.dedent("""
    import sys, time, json
    import pandas as pd, torch
    torch.set_num_threads(1)
    import bmjlib.model.train as T
    slow = float(sys.argv[3])
    orig = T.diffusion_loss
    def paced(*a, **k):
        time.sleep(slow)
        return orig(*a, **k)
    T.diffusion_loss = paced
    args = json.loads(sys.argv[1])
    T.train_stage(args["cfg"], pd.read_csv(args["table"]), sys.argv[2], vae=args["vae"],
                  text_encoder=args["text_encoder"], progress=False)
""")


def _run(args, out, slow=0.0):
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args), str(out), str(slow)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_to_same_result(tmp_path, parts):
    parts["table"].to_csv(tmp_path / "t.csv", index=False)
    args = {"cfg": dict(CFG, max_steps=10, keep_checkpoints=2), "table": str(tmp_path / "t.csv"),
            "vae": parts["vae"], "text_encoder": parts["text_encoder"]}
    ref = _run(args, tmp_path / "ref")  # uninterrupted
    proc = _run(args, tmp_path / "run", slow=0.4)
    ckpt = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not any(T.checkpoint_state(c)["step"] >= 4 for c in T.complete_checkpoints(ckpt)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "model").exists()
    good = T.complete_checkpoints(ckpt)[-1]
    assert T.checkpoint_state(good)["step"] >= 4 and len(list(ckpt.glob("checkpoint_*"))) <= 2  # the last K kept
    # a torn checkpoint newer than the good ones: the UNet's weights cut short
    torn = ckpt / "checkpoint_9"
    shutil.copytree(good, torn)
    (torn / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    resumed = _run(args, tmp_path / "run")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "skipping torn checkpoint checkpoint_9: model.safetensors does not match its recorded sha256" in out
    assert f"resumed from {good.name}" in out
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    a = json.loads((tmp_path / "run" / "train.json").read_text())
    b = json.loads((tmp_path / "ref" / "train.json").read_text())
    assert a["steps"] == b["steps"] == 10
    la, lb = pd.read_csv(tmp_path / "run" / "loss.csv"), pd.read_csv(tmp_path / "ref" / "loss.csv")
    assert list(la["step"]) == list(range(1, 11))
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-4)  # the resumed run took the same steps
    wa = BiomedJourneyPipeline.from_pretrained(tmp_path / "run" / "model").unet.state_dict()
    wb = BiomedJourneyPipeline.from_pretrained(tmp_path / "ref" / "model").unet.state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
