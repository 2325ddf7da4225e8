"""BiomedJourneyPipeline: dual classifier-free guidance in one UNet call, save/load round trip,
4 -> 8 input-channel expansion, seeds, bad input (paper §4.2)."""
import copy

import numpy as np
import pytest
import torch

from bmjlib.model.pipeline import (DEMO_UNET_CONFIG, BiomedJourneyPipeline, build_unet, expand_unet_in_channels,
                             make_scheduler)

TINY_UNET = dict(DEMO_UNET_CONFIG, sample_size=8, block_out_channels=[16, 32], norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=2)
TINY_VAE = {"in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32}
TINY_CLIP = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_text_encoder(seed=0):
    import open_clip

    from bmjlib.model.encoders import TextEncoder

    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in TINY_CLIP.items() if k != "custom_text"})
    return TextEncoder(model, open_clip.SimpleTokenizer(context_length=16), copy.deepcopy(TINY_CLIP))


def tiny_pipeline(seed=0) -> BiomedJourneyPipeline:
    """A complete random-weight pipeline at 32 px (8x8x4 latents), built in well under a second."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    pipe = BiomedJourneyPipeline.build(vae, tiny_text_encoder(seed), TINY_UNET, image_size=32)
    with torch.no_grad():  # a random UNet's outputs are tiny; make them matter for the comparisons
        for p in pipe.unet.conv_out.parameters():
            p.mul_(50)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def shift_decoder(folder) -> None:
    """Rewrite a saved pipeline with its VAE decoder's weights moved (the UNet file stays byte for byte): another
    model under the same UNet, as a fine-tuned decoder makes."""
    pipe = BiomedJourneyPipeline.from_pretrained(folder)
    with torch.no_grad():
        for w in pipe.vae.decoder.parameters():
            w.add_(0.05)
    pipe.save_pretrained(folder)


def prior_image(seed=1, size=40):
    rng = np.random.default_rng(seed)
    return rng.random((size, size)).astype(np.float32)


def test_output_shape_range_and_seed(pipe):
    out = pipe(prior_image(), ["new left effusion", "no change"], steps=3, seed=5)
    assert out.shape == (2, 32, 32) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    again = pipe(prior_image(), ["new left effusion", "no change"], steps=3, seed=5)
    other = pipe(prior_image(), ["new left effusion", "no change"], steps=3, seed=6)
    np.testing.assert_array_equal(out, again)
    assert np.abs(out - other).max() > 1e-3
    # sample i uses seed + i whatever batch it is in
    alone = pipe(prior_image(), "no change", steps=3, seed=6)
    np.testing.assert_allclose(alone[0], out[1], atol=1e-4)
    assert pipe(prior_image(), "x", steps=2, out_size=48).shape == (1, 48, 48)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_save_load_round_trip_identical(pipe, tmp_path, scheduler):
    pipe.save_pretrained(tmp_path / "model")
    loaded = BiomedJourneyPipeline.from_pretrained(tmp_path / "model")
    a = pipe(prior_image(), "new large right pneumothorax", steps=4, scheduler=scheduler, seed=3)
    b = loaded(prior_image(), "new large right pneumothorax", steps=4, scheduler=scheduler, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0


def test_save_overwrites_atomically(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "m")  # replacing an existing folder works and leaves no temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_dual_guidance_formula_in_one_unet_call(pipe):
    torch.manual_seed(0)
    lat = torch.randn(2, 4, 8, 8)
    prior = torch.randn(2, 4, 8, 8)
    text = pipe.projection(pipe.text_states(["new left effusion", "worse edema"]))
    null = pipe.projection(pipe.text_states([""])).expand(2, -1, -1)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, kw_out=None: calls.append(args[0].shape[0]))
    t = torch.tensor(500)
    with torch.no_grad():
        eps = pipe.guided_eps(lat, t, prior, text, null, text_scale=7.5, image_scale=1.5)
    hook.remove()
    assert calls == [6]  # three conditions x two samples in a single call

    def unet(img, ctx):
        with torch.no_grad():
            return pipe.unet(torch.cat([lat, img], 1), t, encoder_hidden_states=ctx).sample
    e_ti, e_i, e_u = unet(prior, text), unet(prior, null), unet(torch.zeros_like(prior), null)
    expected = e_u + 7.5 * (e_ti - e_i) + 1.5 * (e_i - e_u)
    torch.testing.assert_close(eps, expected, atol=2e-3, rtol=1e-3)
    # the three predictions differ, so the formula is not trivially satisfied
    assert (e_ti - e_i).abs().max() > 1e-3 and (e_i - e_u).abs().max() > 1e-3
    # s_text = s_image = 1 is the fully conditioned prediction
    with torch.no_grad():
        torch.testing.assert_close(pipe.guided_eps(lat, t, prior, text, null, 1.0, 1.0), e_ti, atol=1e-4, rtol=1e-4)


def test_expand_saved_4_channel_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    small = build_unet(TINY_UNET, in_channels=4)
    with torch.no_grad():
        for p in small.conv_out.parameters():
            p.mul_(50)
    small.save_pretrained(tmp_path / "unet4")
    four = UNet2DConditionModel.from_pretrained(tmp_path / "unet4").eval()
    eight = expand_unet_in_channels(four, 8).eval()
    assert eight.config.in_channels == 8 and eight.conv_in.weight.shape[1] == 8
    assert four.conv_in.weight.shape[1] == 4  # the argument is untouched
    assert float(eight.conv_in.weight[:, 4:].abs().max()) == 0.0
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = four(x, 10, encoder_hidden_states=ctx).sample
        zero_extra = eight(torch.cat([x, torch.zeros_like(x)], 1), 10, encoder_hidden_states=ctx).sample
        any_extra = eight(torch.cat([x, torch.randn_like(x)], 1), 10, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(zero_extra, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(any_extra, ref, atol=1e-5, rtol=1e-5)  # zero weights ignore the new channels
    with torch.no_grad():
        eight.conv_in.weight[:, 4:].normal_()
        moved = eight(torch.cat([x, torch.randn_like(x)], 1), 10, encoder_hidden_states=ctx).sample
    assert (moved - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already has 8"):
        expand_unet_in_channels(eight, 4)


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="2 priors but 3 prompts"):
        pipe(np.zeros((2, 32, 32)), ["a", "b", "c"], steps=1)
    bad = np.zeros((32, 32), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pipe(bad, "a", steps=1)
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        make_scheduler("pndm", pipe.scheduler_config)
    with pytest.raises(FileNotFoundError, match="not a saved BiomedJourneyPipeline"):
        BiomedJourneyPipeline.from_pretrained("/nonexistent/model")


@pytest.mark.parametrize("kw,msg", [
    ({"text_scale": float("nan")}, "text scale nan is not allowed"),
    ({"image_scale": -1.0}, "image scale -1.0 is not allowed"),
    ({"text_scale": float("inf")}, "text scale inf is not allowed"),
    ({"steps": 0}, "steps 0 is not allowed: give a whole number from 1 to 1000"),
    ({"steps": 1001}, "steps 1001 is not allowed"),
    ({"steps": -1}, "steps -1 is not allowed"),
    ({"seed": -1}, "seed -1 is not allowed"),
    ({"strength": 0.0}, r"strength 0.0 is not allowed: give a number in \(0, 1\]"),
    ({"strength": 1.5}, r"strength 1.5 is not allowed: give a number in \(0, 1\]"),
    ({"strength": float("nan")}, r"strength nan is not allowed: give a number in \(0, 1\]"),
    ({"output": "pixels"}, "output 'pixels' is not allowed: give one of decoded, prior_plus_change"),
])
def test_sampling_settings_are_checked_before_any_work(pipe, kw, msg):
    """The pipeline itself refuses settings that would give a black image or an endless loop, before sampling."""
    calls = []
    with pytest.raises(ValueError, match=msg):
        pipe(prior_image(), "a", **{"steps": 1, **kw}, callback=lambda k, n: calls.append(k))
    assert calls == []


def test_dummy_prior_is_constant_128(pipe):
    d = pipe.dummy_prior(2)
    assert d.shape == (2, 32, 32) and np.all(np.rint(d * 255) == 128)


def test_callback_reports_every_denoising_step_across_batches():
    pipe = tiny_pipeline()
    seen = []
    pipe(np.full((32, 32), 0.5, np.float32), ["a", "b", "c"], steps=3, batch_size=2,
         callback=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 6) for k in range(1, 7)]  # 2 batches x 3 steps, counted monotonically


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_strength_below_one_with_every_scheduler(scheduler):
    """Every sampler starts from the noised prior: the last 3 of 10 steps run, and the output is not the
    strength-1 one."""
    pipe = tiny_pipeline()
    prior = np.full((32, 32), 0.4, np.float32)
    seen = []
    low = pipe(prior, "new left effusion", strength=0.3, steps=10, seed=1, scheduler=scheduler,
               callback=lambda k, n: seen.append(k))
    full = pipe(prior, "new left effusion", strength=1.0, steps=10, seed=1, scheduler=scheduler)
    assert seen == [1, 2, 3]
    assert np.isfinite(low).all() and np.abs(low - full).max() > 1e-3


def test_strength_starts_from_the_noised_prior():
    """strength 1 is InstructPix2Pix's sampling from pure noise (the default); strength s runs the last s of the
    steps from the prior's latent noised to that point (diffusers' img2img)."""
    pipe = tiny_pipeline()
    yy, xx = np.mgrid[:32, :32]
    prior = (0.5 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 5.0)).astype(np.float32)
    kw = dict(steps=10, seed=2, text_scale=3.0, image_scale=1.5)
    full = pipe(prior, "new left effusion", **kw)[0]
    assert np.array_equal(full, pipe(prior, "new left effusion", strength=1.0, **kw)[0])
    seen = []
    low = pipe(prior, "new left effusion", strength=0.2, callback=lambda k, n: seen.append((k, n)), **kw)[0]
    assert seen == [(1, 2), (2, 2)]  # 2 of the 10 steps
    assert np.abs(low - full).max() > 1e-2
    pipe.strength = 0.2  # a model's default (read from its guidance.json) applies when none is given
    assert np.array_equal(low, pipe(prior, "new left effusion", **kw)[0])

    # the first denoising step sees the prior's latent noised to the first kept timestep with the seed's noise
    first = []
    orig = pipe.guided_eps
    pipe.guided_eps = lambda latents, t, *a: first.append((latents.clone(), int(t))) or orig(latents, t, *a)
    pipe(prior, "x", strength=0.3, steps=10, seed=2)
    pipe(prior, "x", strength=1.0, steps=10, seed=2)
    sched = make_scheduler("dpm", pipe.scheduler_config)
    sched.set_timesteps(10)
    z = pipe.prior_factor * pipe.encode_prior(prior[None])
    noise = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(2))[None]
    start = sched.timesteps[7]
    expected = sched.add_noise(z, noise, torch.tensor([start]))
    (lat03, t03), (lat1, t1) = first[0], first[3]
    assert t03 == int(start) and t1 == int(sched.timesteps[0])
    torch.testing.assert_close(lat03, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat1, noise * sched.init_noise_sigma, atol=1e-6, rtol=1e-6)


def test_text_guidance_only_at_the_noisier_steps():
    """text_guidance_min_t m: the steps at t >= m T take the text scale given, the later ones text scale 1 (the image
    scale everywhere); 0 (the default) guides every step and a share above every timestep is sampling at text 1."""
    pipe = tiny_pipeline()
    yy, xx = np.mgrid[:32, :32]
    prior = (0.5 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 5.0)).astype(np.float32)
    kw = dict(steps=10, seed=2, text_scale=4.0, image_scale=1.5)
    seen = []
    orig = pipe.guided_eps
    pipe.guided_eps = lambda latents, t, p, te, ne, ts, im: seen.append((float(t), ts, im)) or orig(latents, t, p, te, ne,
                                                                                                    ts, im)
    half = pipe(prior, "new left effusion", text_guidance_min_t=0.5, **kw)[0]
    assert len(seen) == 10 and {ts for t, ts, _ in seen if t >= 500} == {4.0} and {ts for t, ts, _ in seen if t < 500} == {1.0}
    assert {im for *_, im in seen} == {1.5} and sum(t >= 500 for t, *_ in seen) == 5
    full = pipe(prior, "new left effusion", **kw)[0]
    assert np.array_equal(full, pipe(prior, "new left effusion", text_guidance_min_t=0.0, **kw)[0])
    none = pipe(prior, "new left effusion", text_guidance_min_t=0.999, **kw)[0]
    assert np.array_equal(none, pipe(prior, "new left effusion", **dict(kw, text_scale=1.0))[0])
    assert np.abs(half - full).max() > 1e-5 and np.abs(half - none).max() > 1e-5  # random weights: a small effect
    pipe.text_guidance_min_t = 0.5  # a model's default (read from its guidance.json) applies when none is given
    assert np.array_equal(half, pipe(prior, "new left effusion", **kw)[0])
    for bad in (-0.1, 1.0, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match=r"text_guidance_min_t .* is not allowed: give a number in \[0, 1\)"):
            pipe(prior, "new left effusion", text_guidance_min_t=bad, **kw)


def test_the_edit_mask_keeps_the_prior_outside_it():
    """edit_mask r: the final latent is the prior's latent wherever `edit_region` is 0 and the sampled one elsewhere; the
    region is the same whatever the batch; 0 (the default) samples as before; a ratio no pixel reaches returns the prior
    through the VAE; a value that is not a finite number >= 0 is refused, naming it."""
    pipe = tiny_pipeline()
    yy, xx = np.mgrid[:32, :32]
    priors = np.stack([(0.5 + 0.4 * np.sin(xx / (3.0 + k)) * np.cos(yy / 5.0)) for k in range(3)]).astype(np.float32)
    kw = dict(steps=8, seed=4, text_scale=4.0, image_scale=1.5, strength=0.8)
    latents = []
    orig = pipe.decode_latents
    pipe.decode_latents = lambda lat, **k: latents.append(lat.clone()) or orig(lat, **k)
    out = pipe(priors, "new left effusion", edit_mask=2.0, **kw)
    region = pipe.edit_region(priors, "new left effusion", edit_mask=2.0, seed=4)
    assert region.shape == (3, 32, 32) and set(np.unique(region)) <= {0.0, 1.0} and 0.05 < region.mean() < 0.95
    f = pipe.latent_factor
    cell = torch.from_numpy(region[:, ::f, ::f])[:, None].expand_as(latents[0])
    prior_latent = pipe.prior_factor * pipe.encode_prior(priors)
    assert torch.equal(latents[0][cell == 0], prior_latent[cell == 0])
    assert (latents[0][cell == 1] - prior_latent[cell == 1]).abs().max() > 1e-2
    alone = pipe(priors[2], "new left effusion", edit_mask=2.0, **dict(kw, seed=6))[0]
    np.testing.assert_allclose(alone, out[2], atol=1e-4)  # sample i's mask and noise come from seed + i
    assert np.array_equal(region[2], pipe.edit_region(priors[2], "new left effusion", edit_mask=2.0, seed=6)[0])
    pipe.decode_latents = orig
    plain = pipe(priors, "new left effusion", **kw)
    assert np.array_equal(plain, pipe(priors, "new left effusion", edit_mask=0.0, **kw))
    assert np.all(pipe.edit_region(priors, "new left effusion", edit_mask=0.0) == 1)
    np.testing.assert_allclose(pipe(priors, "new left effusion", edit_mask=1e9, **kw), pipe.reconstruct(priors), atol=1e-6)
    pipe.edit_mask = 2.0  # a model's default (read from its guidance.json) applies when none is given
    assert np.array_equal(out, pipe(priors, "new left effusion", **kw))
    pipe.edit_mask = 0.0
    for bad in (-1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match=r"edit_mask .* is not allowed: give a finite number >= 0"):
            pipe(priors, "new left effusion", edit_mask=bad, **kw)


def test_the_shipped_models_edit_mask_is_where_the_phantom_changes():
    """Known answer: on phantom priors the shipped demo model's edit region for "New large <side> pleural effusion."
    (diffusers' ratio 3) lies on the patient's <side> (image left = patient's right) and covers most of the pixels
    that the phantom drawn again with that effusion changes, while holding a small part of the image."""
    from bmjlib.io import resize_image
    from bmjlib.phantom import cohort as phantom
    from bmjlib.phantom.anatomy import render
    from bmjlib.phantom.body import Exposure, Pose, State

    rng = np.random.default_rng(3)
    priors, truth = [], {"right": [], "left": []}
    for i in range(4):
        patient = phantom.sample_patient(rng, phantom.subject_id_for(i))
        raw = render(patient, State(), Pose(), Exposure(), size=128, noise_seed=i).astype(np.float32)
        lo, hi = raw.min(), raw.max()
        priors.append(resize_image((raw - lo) / (hi - lo), 64))
        for side in truth:
            drawn = render(patient, State(sev={"effusion": 3}, side={"effusion": side}), Pose(), Exposure(), size=128,
                           noise_seed=i).astype(np.float32)
            truth[side].append(resize_image((drawn - lo) / (hi - lo), 64))
    priors = np.stack(priors)
    pipe = BiomedJourneyPipeline.from_pretrained("demo")
    for side, half in (("right", slice(0, 32)), ("left", slice(32, 64))):
        region = pipe.edit_region(priors, f"New large {side} pleural effusion.", edit_mask=3.0, seed=0)
        changed = np.abs(np.stack(truth[side]) - priors) > 0.1
        assert (region[:, :, half].sum((1, 2)) / region.sum((1, 2)) > 0.7).all(), side
        assert region.mean() < 0.25 and (region * changed).sum() / changed.sum() > 0.65, side


def test_a_model_trained_on_part_of_the_schedule_refuses_stronger_starts(tmp_path):
    """A UNet trained only on t < 0.6 T (TrainConfig.timestep_max) keeps that bound through save and load, samples
    at strengths up to it and refuses a start from noisier latents with one line, before any step."""
    pipe = tiny_pipeline()
    pipe.max_strength = 0.6
    loaded = BiomedJourneyPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m"))
    assert loaded.max_strength == 0.6 and loaded.strength == 0.6  # no guidance.json: the strongest start it knows
    assert tiny_pipeline().max_strength == 1.0  # the default: the whole schedule
    prior = prior_image()
    assert np.isfinite(loaded(prior, "new left effusion", steps=5, seed=0, strength=0.6)[0]).all()
    calls = []
    for s in (0.7, 1.0):
        with pytest.raises(ValueError, match=f"strength {s:g} is not allowed for this model: it was trained on the "
                                             r"first 0.6 of the noise schedule only"):
            loaded(prior, "new left effusion", steps=5, seed=0, strength=s, callback=lambda k, n: calls.append(k))
    assert calls == []


@pytest.mark.parametrize("value", ["abc", 0, 1.5, True, None])
def test_a_damaged_max_strength_is_refused_on_load(tmp_path, value):
    import json

    from bmjlib.model.pipeline import ModelFolderError
    folder = tiny_pipeline().save_pretrained(tmp_path / "m")
    meta = json.loads((folder / "bmj_pipeline.json").read_text())
    (folder / "bmj_pipeline.json").write_text(json.dumps(dict(meta, max_strength=value)))
    with pytest.raises(ModelFolderError, match=r"bmj_pipeline.json max_strength .* is not a number in \(0, 1\]"):
        BiomedJourneyPipeline.from_pretrained(folder)


def test_a_default_strength_above_what_the_model_was_trained_for_is_refused_on_load(tmp_path):
    import json

    from bmjlib.model.pipeline import ModelFolderError
    pipe = tiny_pipeline()
    pipe.max_strength = 0.7
    folder = pipe.save_pretrained(tmp_path / "m")
    (folder / "guidance.json").write_text(json.dumps({"text_scale": 7.5, "image_scale": 1.5,
                                                      "settings": {"strength": 1.0}}))
    with pytest.raises(ModelFolderError, match="settings.strength 1 is above the max_strength 0.7"):
        BiomedJourneyPipeline.from_pretrained(folder)
    (folder / "guidance.json").write_text(json.dumps({"text_scale": 7.5, "image_scale": 1.5,
                                                      "settings": {"strength": 0.7}}))
    assert BiomedJourneyPipeline.from_pretrained(folder).strength == 0.7


def test_prior_plus_change_keeps_the_detail_the_vae_loses():
    """output="prior_plus_change" is the prior plus the decoded change, decode(sampled) - decode(prior), from the same
    sample: a 1 px checkerboard on the prior, which the VAE cannot carry, comes through it and not through "decoded"."""
    pipe = tiny_pipeline()
    yy, xx = np.mgrid[:32, :32]
    checker = np.where((yy + xx) % 2 == 0, 0.1, -0.1).astype(np.float32)
    prior = (0.3 + 0.4 * xx / 31 + checker).astype(np.float32)
    kw = dict(steps=4, seed=3, strength=0.5)
    decoded = pipe(prior, "new left effusion", **kw)[0]
    kept = pipe(prior, "new left effusion", output="prior_plus_change", **kw)[0]
    change = decoded - pipe.reconstruct(prior)[0]
    np.testing.assert_allclose(kept, np.clip(prior + change, 0, 1), atol=1e-5)
    def checker_gain(x):  # the share of the prior's checkerboard found in x (1 = all of it)
        return float((x * checker).sum() / (checker * checker).sum())
    assert checker_gain(kept) > 0.8 and abs(checker_gain(decoded)) < 0.2
    pipe.output = "prior_plus_change"  # a model's default (read from its guidance.json) applies when none is given
    assert np.array_equal(pipe(prior, "new left effusion", **kw)[0], kept)


def test_a_model_folder_carries_its_output(tmp_path):
    import json

    from bmjlib.model.pipeline import ModelFolderError
    folder = tiny_pipeline().save_pretrained(tmp_path / "m")
    assert BiomedJourneyPipeline.from_pretrained(folder).output == "decoded"  # no guidance.json: the paper's
    g = {"text_scale": 7.5, "image_scale": 1.5, "settings": {"strength": 0.7, "output": "prior_plus_change"}}
    (folder / "guidance.json").write_text(json.dumps(g))
    assert BiomedJourneyPipeline.from_pretrained(folder).output == "prior_plus_change"
    g["settings"]["output"] = "residual"
    (folder / "guidance.json").write_text(json.dumps(g))
    with pytest.raises(ModelFolderError, match="guidance.json settings.output 'residual' is not one of decoded, "
                                               "prior_plus_change"):
        BiomedJourneyPipeline.from_pretrained(folder)
