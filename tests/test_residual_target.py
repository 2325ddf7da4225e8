"""The residual diffusion target (a demo-profile departure, TrainConfig.target = "residual"): training diffuses
(follow-up latent - prior latent) x residual_scale, sampling adds the prior's latent back; stage 1 and the paper
profile diffuse the image."""
import json

import numpy as np
import pytest
import torch

import bmjlib.model.train as T
from bmjlib.model.pipeline import BiomedJourneyPipeline
from bmjlib.runtime import load_profile

from test_pipeline import tiny_pipeline
from test_train import CFG, parts  # noqa: F401  (the fixture of a tiny VAE, text encoder and image table)


def test_residual_scale_is_one_over_the_residuals_std():
    g = torch.Generator().manual_seed(0)
    prior = torch.randn(600, 4, 6, 6, generator=g)
    target = 0.2 * prior + 0.05 * torch.randn(600, 4, 6, 6, generator=g)
    data = T.TensorData(target, prior, torch.zeros(600, 3, 8), torch.zeros(1, 3, 8))
    assert T.residual_scale(data, 0.2) == pytest.approx(20.0, rel=0.02)
    with pytest.raises(ValueError, match="every training follow-up equals its prior"):
        T.residual_scale(T.TensorData(0.2 * prior, prior, data.text, data.null_states), 0.2)


def test_sampling_adds_the_prior_latent_back():
    """Same weights, seed and prompts: the residual model's final latent is k x prior latent + the image model's
    final latent / residual_scale (k = the VAE's scaling factor for IP2P's unscaled prior latent)."""
    pipe = tiny_pipeline()
    prior = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32)
    seen = []
    pipe.decode_latents = lambda z, **kw: seen.append(z.clone()) or torch.zeros(len(z), 1, 32, 32)
    pipe(prior, "new left pleural effusion", steps=3, seed=5)
    pipe.target, pipe.residual_scale = "residual", 4.0
    pipe(prior, "new left pleural effusion", steps=3, seed=5)
    k = pipe.vae.config.scaling_factor
    want = k * pipe.encode_prior(prior) + seen[0] / 4.0
    assert torch.allclose(seen[1], want, atol=1e-5)


def test_a_residual_stage_records_its_scale_and_stage_1_diffuses_the_image(tmp_path, parts):  # noqa: F811
    tab = parts["table"]
    m1 = T.train_stage(dict(CFG, max_steps=2, target="residual"), tab, tmp_path / "s1", vae=parts["vae"],
                       text_encoder=parts["text_encoder"], progress=False)
    assert json.loads((tmp_path / "s1" / "train.json").read_text())["config"]["target"] == "image"
    assert BiomedJourneyPipeline.from_pretrained(m1).target == "image"
    m2 = T.train_stage(dict(CFG, max_steps=2, target="residual"), tab, tmp_path / "s2", init_from=m1,
                       prior="registered", text_column="description", cache_dir=tmp_path / "s1" / "latents",
                       progress=False)
    meta = json.loads((m2 / "bmj_pipeline.json").read_text())
    pipe = BiomedJourneyPipeline.from_pretrained(m2)
    assert meta["target"] == pipe.target == "residual" and pipe.residual_scale == meta["residual_scale"] > 0
    with pytest.raises(ValueError, match="target: 'delta' is not one of image, residual"):
        T.TrainConfig.from_dict(dict(CFG, target="delta"))


def test_the_paper_profile_keeps_the_papers_target_and_data():
    demo, paper = load_profile("demo"), load_profile("paper")
    assert demo["diffusion_target"] == "image"
    assert paper["diffusion_target"] == "image" and paper["stable_triples"] == 0 and paper["match_targets"] is False
