"""The training options where the paper is silent (min-SNR-gamma weighting, the changed-region loss weight, the
share of the noise schedule trained, the lr schedule) against their formulas, and the schedule's state surviving a
resume."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import bmjlib.model.train as T
from bmjlib.model.pipeline import BiomedJourneyPipeline, train_scheduler

from test_pipeline import TINY_UNET, tiny_pipeline
from test_train import CFG, make_table


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _batch(pipe, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    prior = torch.randn(n, 4, 8, 8, generator=g)
    target = prior.clone()
    target[:, :, :, :4] += 2 * torch.randn(n, 4, 8, 4, generator=g)  # the follow-up differs in the left half only
    with torch.no_grad():
        text = pipe.text_states(["new left pleural effusion"] * n)
        null = pipe.text_states([""])
    return {"target": target, "prior": prior, "text": text, "null": null}


def _prediction(pipe, sched, batch, seed, t_hi=None):
    """What diffusion_loss draws with a generator seeded `seed` (noise, timesteps), recomputed, and the UNet's
    output on that noisy input: (pred, noise, t)."""
    g = torch.Generator().manual_seed(seed)
    n = len(batch["target"])
    noise = torch.randn(batch["target"].shape, generator=g)
    t = torch.randint(0, t_hi or sched.config.num_train_timesteps, (n,), generator=g)
    noisy = sched.add_noise(batch["target"], noise, t)
    with torch.no_grad():
        pred = pipe.unet(torch.cat([noisy, batch["prior"]], 1), t,
                         encoder_hidden_states=pipe.projection(batch["text"])).sample
    return pred, noise, t


def _per_pixel_error(pipe, sched, batch, seed, t_hi=None):
    """The epsilon-prediction squared error of `_prediction`'s output, and its timesteps."""
    pred, noise, t = _prediction(pipe, sched, batch, seed, t_hi)
    return (pred - noise) ** 2, t


def _loss(pipe, sched, batch, seed, **kw):
    with torch.no_grad():
        return float(T.diffusion_loss(pipe.unet, pipe.projection, sched, batch, torch.Generator().manual_seed(seed),
                                      0.0, **kw))


def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr(pipe):
    sched = train_scheduler(pipe.scheduler_config)
    batch = _batch(pipe)
    err, t = _per_pixel_error(pipe, sched, batch, seed=3)
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)  # Hang et al.: SNR(t) = alpha_bar / (1 - alpha_bar); eps-prediction weight min(SNR, g) / SNR
    per = err.mean((1, 2, 3)).double()
    assert _loss(pipe, sched, batch, 3) == pytest.approx(float(per.mean()), rel=1e-5)
    weighted = float((per * torch.clamp(snr, max=5.0) / snr).mean())
    assert _loss(pipe, sched, batch, 3, snr_gamma=5.0) == pytest.approx(weighted, rel=1e-4)
    assert abs(weighted - float(per.mean())) > 1e-3 * float(per.mean())  # the weighting changes this batch's loss
    # a gamma above every sample's SNR weighs nothing down: plain MSE
    assert _loss(pipe, sched, batch, 3, snr_gamma=float(snr.max()) * 2) == pytest.approx(float(per.mean()), rel=1e-5)


def test_change_weight_moves_the_loss_onto_the_changed_pixels(pipe):
    sched = train_scheduler(pipe.scheduler_config)
    batch = _batch(pipe)
    err, _ = _per_pixel_error(pipe, sched, batch, seed=4)
    batch["change"] = (batch["target"] - batch["prior"]).abs().mean(1, keepdim=True)
    d = batch["change"]
    w = 1 + 3.0 * d / d.mean((2, 3), keepdim=True)
    w = w / w.mean((2, 3), keepdim=True)
    assert (d[..., 4:] == 0).all() and w[..., :4].mean() > 1.5 * w[..., 4:].mean()  # left half weighted up
    expected = float((err * w).mean())
    assert _loss(pipe, sched, batch, 4, change_weight=3.0) == pytest.approx(expected, rel=1e-4)
    assert abs(expected - float(err.mean())) > 1e-4
    # no change map (stage 1, whose prior is the dummy): the plain loss
    del batch["change"]
    assert _loss(pipe, sched, batch, 4, change_weight=3.0) == pytest.approx(float(err.mean()), rel=1e-5)


def test_null_text_keeps_trains_the_text_dropped_samples_to_return_the_prior(pipe):
    sched = train_scheduler(pipe.scheduler_config)
    batch = _batch(pipe)
    keep = dict(batch, keep=batch["prior"] * 0.5)  # the prior on the target's scale (here a factor 0.5)

    def loss(b, dropout):
        with torch.no_grad():
            return float(T.diffusion_loss(pipe.unet, pipe.projection, sched, b, torch.Generator().manual_seed(7),
                                          dropout))
    # no sample has its text dropped: the prior is never a target, the loss is the plain one
    assert loss(keep, 0.0) == pytest.approx(loss(batch, 0.0), rel=1e-6)
    # cond_dropout 1: every sample has its text (alone) dropped, so every sample is trained to return the prior
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(batch["target"].shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(noise),), generator=g)
    with torch.no_grad():
        pred = pipe.unet(torch.cat([sched.add_noise(keep["keep"], noise, t), batch["prior"]], 1), t,
                         encoder_hidden_states=pipe.projection(batch["null"].expand_as(batch["text"]))).sample
    expected = float(((pred - noise) ** 2).mean())
    assert loss(keep, 1.0) == pytest.approx(expected, rel=1e-5)
    assert abs(loss(batch, 1.0) - expected) > 1e-3 * expected  # without it they learn the follow-up


def test_timestep_max_trains_only_the_noise_levels_a_sampler_at_that_strength_visits(pipe):
    sched = train_scheduler(pipe.scheduler_config)
    batch = _batch(pipe, n=64)
    err, t = _per_pixel_error(pipe, sched, batch, seed=5, t_hi=300)
    assert int(t.max()) < 300 and int(t.max()) > 250  # the whole first 30 % of the schedule, nothing above
    assert _loss(pipe, sched, batch, 5, timestep_max=0.3) == pytest.approx(float(err.mean()), rel=1e-5)
    full, t_full = _per_pixel_error(pipe, sched, batch, seed=5)
    assert int(t_full.max()) >= 300 and _loss(pipe, sched, batch, 5) == pytest.approx(float(full.mean()), rel=1e-5)
    # an img2img sampler at strength 0.7 (20 DPM steps) starts below 70 % of the schedule: every step is trained
    from bmjlib.model.pipeline import make_scheduler
    s = make_scheduler("dpm", pipe.scheduler_config)
    s.set_timesteps(20)
    first = int(round(len(s.timesteps) * (1 - 0.7)))
    assert int(s.timesteps[first]) < round(0.7 * sched.config.num_train_timesteps)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"timestep_max: {bad} is not in \\(0, 1\\]"):
            T.TrainConfig.from_dict({"timestep_max": bad})


def _trainer(cfg, total):
    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    data = T.TensorData(torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g),
                        pipe.text_states(["x"] * 8).detach(), pipe.text_states([""]).detach())
    cfg = T.TrainConfig.from_dict(dict(cfg, image_size=32, batch_size=4, hflip=False, unet_config=TINY_UNET))
    return T.Trainer(cfg, pipe.unet, pipe.projection, train_scheduler(pipe.scheduler_config), data,
                     T.make_accelerator(cfg, cpu=True), total_steps=total)


def test_cosine_schedule_follows_its_formula_and_constant_stays():
    tr = _trainer(dict(lr=1e-3, lr_schedule="cosine", lr_warmup_steps=2), total=10)
    lrs = []
    for s in range(10):
        lrs.append(tr.opt.param_groups[0]["lr"])
        assert tr.step(s)[0]
    expected = [1e-3 * k / 2 for k in range(2)] + [1e-3 * 0.5 * (1 + np.cos(np.pi * (k - 2) / 8)) for k in range(2, 10)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-12)
    const = _trainer(dict(lr=1e-3), total=10)
    for s in range(3):
        const.step(s)
    assert const.opt.param_groups[0]["lr"] == 1e-3 and const.lr_sched is None
    with pytest.raises(ValueError, match="lr_schedule: 'step' is not one of constant, cosine, linear"):
        _trainer(dict(lr_schedule="step"), total=10)


def test_resume_restores_the_lr_schedule(tmp_path, monkeypatch):
    d = tmp_path / "parts"
    pipe = tiny_pipeline()
    pipe.vae.save_pretrained(d / "vae")
    pipe.text_encoder.save(d / "text_encoder")
    table = make_table(d / "img")
    cfg = dict(CFG, max_steps=6, checkpoint_every=3, lr=2e-3, lr_schedule="cosine", snr_gamma=5.0, change_weight=1.0)
    kw = dict(vae=str(d / "vae"), text_encoder=f"local-dir:{d / 'text_encoder'}", progress=False)
    ref = T.train_stage(cfg, table, tmp_path / "ref", **kw)

    orig = T.Trainer.step

    def stop_after_the_checkpoint(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return orig(self, step)
    monkeypatch.setattr(T.Trainer, "step", stop_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        T.train_stage(cfg, table, tmp_path / "run", **kw)
    monkeypatch.setattr(T.Trainer, "step", orig)
    run = T.train_stage(cfg, table, tmp_path / "run", **kw)
    la, lb = pd.read_csv(tmp_path / "run" / "loss.csv"), pd.read_csv(tmp_path / "ref" / "loss.csv")
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-4)
    wa = BiomedJourneyPipeline.from_pretrained(run).unet.state_dict()
    wb = BiomedJourneyPipeline.from_pretrained(ref).unet.state_dict()
    for k in wa:  # a schedule restarted at the resume would take steps 4-6 at other rates
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def _stage_parts(tmp_path):
    """A tiny model's frozen parts saved as folders, a training table, and a two-step config: what train_stage needs."""
    d = tmp_path / "parts"
    pipe = tiny_pipeline()
    pipe.vae.save_pretrained(d / "vae")
    pipe.text_encoder.save(d / "text_encoder")
    kw = dict(vae=str(d / "vae"), text_encoder=f"local-dir:{d / 'text_encoder'}", progress=False)
    return make_table(d / "img"), kw, dict(CFG, max_steps=2, checkpoint_every=2)


def test_timestep_max_is_part_of_the_stage_key(tmp_path):
    table, kw, cfg = _stage_parts(tmp_path)
    T.train_stage(cfg, table, tmp_path / "run", **kw)
    key = json.loads((tmp_path / "run" / "train.json").read_text())["key"]
    T.train_stage(dict(cfg, timestep_max=0.5), table, tmp_path / "run", **kw)
    assert json.loads((tmp_path / "run" / "train.json").read_text())["key"] != key  # a new option value retrains
    T.train_stage(cfg, table, tmp_path / "run", **kw)
    assert json.loads((tmp_path / "run" / "train.json").read_text())["key"] == key


def test_v_prediction_regresses_the_velocity_with_its_min_snr_weight(pipe):
    """With a v_prediction schedule the UNet's output is scored against alpha_t x noise - sigma_t x target (Salimans
    & Ho 2022), and min-SNR's weight is min(snr, gamma) / (snr + 1)."""
    eps = train_scheduler(pipe.scheduler_config)
    v = train_scheduler(dict(pipe.scheduler_config, prediction_type="v_prediction"))
    batch = _batch(pipe)
    pred, noise, t = _prediction(pipe, v, batch, seed=5)
    ac = v.alphas_cumprod[t][:, None, None, None]
    velocity = ac.sqrt() * noise - (1 - ac).sqrt() * batch["target"]
    per = ((pred - velocity) ** 2).mean((1, 2, 3)).double()
    assert _loss(pipe, v, batch, 5) == pytest.approx(float(per.mean()), rel=1e-5)
    assert abs(_loss(pipe, eps, batch, 5) - float(per.mean())) > 1e-3  # epsilon scores the same output otherwise
    snr = (ac / (1 - ac)).flatten().double()
    assert _loss(pipe, v, batch, 5, snr_gamma=5.0) == pytest.approx(
        float((per * torch.clamp(snr, max=5.0) / (snr + 1)).mean()), rel=1e-4)


def test_prediction_type_is_saved_with_the_model_read_by_its_samplers_and_part_of_the_key(tmp_path):
    table, kw, cfg = _stage_parts(tmp_path)
    eps_dir = T.train_stage(cfg, table, tmp_path / "eps", **kw)
    v_dir = T.train_stage(dict(cfg, prediction_type="v_prediction"), table, tmp_path / "v", **kw)
    key = lambda run: json.loads((tmp_path / run / "train.json").read_text())["key"]  # noqa: E731
    assert key("eps") != key("v")
    saved = json.loads((v_dir / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    v_pipe, eps_pipe = BiomedJourneyPipeline.from_pretrained(v_dir), BiomedJourneyPipeline.from_pretrained(eps_dir)
    assert v_pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert eps_pipe.scheduler_config["prediction_type"] == "epsilon"
    # the same weights sampled as velocity or as noise give different images: the samplers read the setting
    eps_pipe.unet.load_state_dict(v_pipe.unet.state_dict())
    eps_pipe.projection.load_state_dict(v_pipe.projection.state_dict())
    prior = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    a = v_pipe(prior, ["new left pleural effusion"], steps=3, seed=0)
    b = eps_pipe(prior, ["new left pleural effusion"], steps=3, seed=0)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="prediction_type: 'velocity' is not one of epsilon, v_prediction"):
        T.train_stage(dict(cfg, prediction_type="velocity"), table, tmp_path / "bad", **kw)
