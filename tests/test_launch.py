"""`python -m bmjlib.model.launch` (multi-GPU training outside Jupyter) makes exactly the notebooks' calls."""
from dataclasses import replace
import json

import pandas as pd
import pytest

from bmjlib.evaluation import ablations
from bmjlib.model import launch, stages
from bmjlib.model.configs import DEMO_UNET_CONFIG
from bmjlib.model.train import TrainConfig
from bmjlib.chain import load_profile


@pytest.mark.slow
def test_launch_finds_the_notebooks_models_up_to_date(smoke_run, capsys):
    run = smoke_run
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("0[45]_*/**/train.json")}
    assert len(stamps) == 3  # stage 1, stage 2, one-stage
    p = load_profile("smoke")
    capsys.readouterr()
    assert launch.stage1(str(run), p) == run / "04_stage1" / "model"
    assert launch.stage2(str(run), p) == [run / "05_stage2" / "model", run / "05_stage2" / "one_stage" / "model"]
    out = capsys.readouterr().out
    assert out.count("is up to date") == 3, out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a launched stage retrained what the notebook made"


def _fake_run(tmp_path):
    """A run folder with what the training steps read: stage-1 pairs, triples and stage 1's VAE config."""
    run = tmp_path / "run"
    (run / "01_cohort").mkdir(parents=True)
    pd.DataFrame({"image_path": ["a.png"], "impression": ["x"], "split": ["train"]}).to_csv(
        run / "01_cohort" / "stage1.csv", index=False)
    (run / "03_descriptions").mkdir()
    pd.DataFrame({"prior_path": ["p.png"], "registered_path": ["r.png"], "description": ["y"],
                  "split": ["train"]}).to_csv(run / "03_descriptions" / "pairs.csv", index=False)
    vae = run / "04_stage1" / "model" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64]}))  # factor 4
    return run, vae


def test_train_config_is_what_the_smoke_profile_implies(tmp_path):
    _, vae = _fake_run(tmp_path)
    p = load_profile("smoke")
    expected = dict(image_size=32, batch_size=16, lr=1e-4, cond_dropout=0.1, ema=True, checkpoint_every=5, seed=0,
                    match_targets=True, snr_gamma=5.0, change_weight=1.0, timestep_max=0.7, prediction_type="v_prediction",
                    hflip=False,  # the demo's
                    unet_config=dict(DEMO_UNET_CONFIG, sample_size=8))
    assert stages.train_config(p, vae, epochs=p["stage1_epochs"]) == TrainConfig(epochs=2, **expected)
    assert stages.train_config(p, vae, epochs=p["stage2_epochs"]) == TrainConfig(epochs=2, **expected)
    # Table 2's arms: abl_steps optimiser steps, no EMA even where the profile asks for it
    arm = ablations.arm_config(tmp_path / "run", p)
    assert arm == TrainConfig(max_steps=2, **dict(expected, ema=False)) and arm.epochs == TrainConfig().epochs
    assert stages.train_config(dict(p, use_ema=False), vae).ema is False
    # the paper trains on flipped chests too (§5.1); the demo keeps every heart on the left
    assert stages.train_config(load_profile("paper"), vae).hflip is True
    assert stages.train_config(load_profile("paper"), vae).change_weight == 0.0  # every latent pixel alike


def test_launch_trains_through_the_entry_points(tmp_path, monkeypatch):
    run, vae = _fake_run(tmp_path)
    comp = {"vae": str(vae), "text_encoder": f"local-dir:{vae.parent / 'text_encoder'}"}
    calls = []
    monkeypatch.setattr(stages, "prepare_components", lambda table, out, **kw: calls.append(("components", out, kw))
                        or comp)
    monkeypatch.setattr(stages, "train_stage", lambda cfg, table, out, **kw: calls.append((cfg, table, out, kw))
                        or out / "model")
    p = load_profile("smoke")
    cfg = stages.train_config(p, vae, epochs=2)

    assert launch.stage1(str(run), p) == run / "04_stage1" / "model"
    (_, out, kw), (c, table, out1, kw1) = calls
    # stage 1 trains with the plain loss over the whole schedule; stage 2 with the profile's min-SNR weighting on
    # the share of the schedule its sampler visits
    assert cfg.snr_gamma == 5.0 and c.snr_gamma == 0.0 and cfg.timestep_max == 0.7 and c.timestep_max == 1.0
    assert out == out1 == run / "04_stage1" and c == replace(cfg, snr_gamma=0.0, timestep_max=1.0, change_weight=0.0)
    assert list(table["impression"]) == ["x"]
    assert kw == dict(model_scale="demo", image_size=32, vae_steps=20, clip_epochs=2, seed=0, sd_vae_dir="",
                      text_encoder="", vae_ssim_weight=1.0, vae_decoder_steps=5,
                      vae_decoder_lr=1e-4)
    assert kw1 == dict(prior="dummy", text_column="impression", vae=comp["vae"], text_encoder=comp["text_encoder"],
                       cache_dir=run / "cache" / "latents", unet_init=None,
                       split=("train", "val"))  # the paper's stage 1: every p10-p18 image (69,846)

    calls.clear()
    s1 = run / "04_stage1"
    assert launch.stage2(str(run), p) == [run / "05_stage2" / "model", run / "05_stage2" / "one_stage" / "model"]
    (c2, t2, o2, k2), (c3, t3, o3, k3) = calls
    assert c2 == c3 == cfg and list(t2["description"]) == list(t3["description"]) == ["y"]
    assert (o2, k2) == (run / "05_stage2", dict(init_from=s1 / "model", prior="registered", text_column="description",
                                                cache_dir=run / "cache" / "latents", cache_only=False))
    assert (o3, k3) == (run / "05_stage2" / "one_stage", dict(
        prior="registered", text_column="description", vae=s1 / "model" / "vae",
        text_encoder=f"local-dir:{s1 / 'model' / 'text_encoder'}", cache_dir=run / "cache" / "latents", unet_init=None))
    calls.clear()
    assert launch.stage2(str(run), dict(p, one_stage=False)) == [run / "05_stage2" / "model"] and len(calls) == 1
