"""The InstructPix2Pix latent convention (paper §4.2: BiomedJourney is InstructPix2Pix-style): with the same
weights, prior pixels, prompt embeddings, seed and scheduler, bmj's pipeline and diffusers' own
`StableDiffusionInstructPix2PixPipeline` give the same image; IP2P- and SD-v1.5-style UNet checkpoints
initialise the bmj UNet; the convention is recorded in the model folder."""
import importlib.util
import json
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import is_transformers_available

import bmjlib.model.train as T
from bmjlib.model.pipeline import (BiomedJourneyPipeline, ModelFolderError, build_unet, make_scheduler,
                                   to_batch)

from test_pipeline import TINY_UNET, TINY_VAE, tiny_pipeline, tiny_text_encoder

PROMPTS = ["new left pleural effusion", "no change"]


def rgb_pipeline(seed=0) -> BiomedJourneyPipeline:
    """tiny_pipeline with a 3-channel (RGB, Stable Diffusion-like) VAE."""
    pipe = tiny_pipeline(seed)
    torch.manual_seed(seed)
    pipe.vae = AutoencoderKL(**dict(TINY_VAE, in_channels=3, out_channels=3))
    return pipe


def priors(n=2, size=32, seed=1):
    return np.random.default_rng(seed).random((n, size, size)).astype(np.float32)


@lru_cache(maxsize=1)
def ip2p_pipeline_class():
    """diffusers' StableDiffusionInstructPix2PixPipeline. Without transformers (not a bmj dependency) diffusers
    exports only a placeholder, so its module is run from the installed source with the transformers-typed
    imports, the safety checker and the LoRA / IP-adapter / textual-inversion / single-file loader mixins
    (none used with prompt embeddings and no safety checker) replaced by stand-ins; all sampling code is
    diffusers' own."""
    if is_transformers_available():
        from diffusers import StableDiffusionInstructPix2PixPipeline
        return StableDiffusionInstructPix2PixPipeline
    spec = importlib.util.find_spec("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix")
    src = Path(spec.origin).read_text()
    mixins = ("FromSingleFileMixin", "IPAdapterMixin", "StableDiffusionLoraLoaderMixin", "TextualInversionLoaderMixin")
    stand_ins = {
        "from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection\n":
            "CLIPImageProcessor = CLIPTextModel = CLIPTokenizer = CLIPVisionModelWithProjection = object\n",
        f"from ...loaders import {', '.join(mixins)}\n": "".join(f"class {m}: pass\n" for m in mixins),
        "from .safety_checker import StableDiffusionSafetyChecker\n": "StableDiffusionSafetyChecker = object\n"}
    for old, new in stand_ins.items():
        assert src.count(old) == 1, f"diffusers' InstructPix2Pix module no longer has the line {old!r}"
        src = src.replace(old, new)
    mod = types.ModuleType("bmj_test_ip2p")
    mod.__package__, mod.__file__ = "diffusers.pipelines.stable_diffusion", spec.origin
    exec(compile(src, spec.origin, "exec"), mod.__dict__)
    return mod.StableDiffusionInstructPix2PixPipeline


def diffusers_ip2p(pipe: BiomedJourneyPipeline, unet=None, scheduler="dpm"):
    """diffusers' InstructPix2Pix pipeline around the bmj pipeline's VAE and UNet. It has no text encoder:
    it is given bmj's projected token states as prompt embeddings."""
    ref = ip2p_pipeline_class()(
        vae=pipe.vae, text_encoder=None, tokenizer=None, unet=unet or pipe.unet,
        scheduler=make_scheduler(scheduler, pipe.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_diffusers(pipe, prior, prompts, steps, scheduler, seed, unet=None, text_scale=7.5, image_scale=1.5):
    """Images N,H,W,C in [0,1] from diffusers, fed as bmj feeds its own pipeline: the prior at the model's size
    in [0,1] (grey repeated to the VAE's channels), [text, empty, empty] prompt states, seed + i per sample."""
    n = len(prompts)
    x = to_batch(prior, pipe.image_size)
    x = x.repeat(1, pipe.vae.config.in_channels, 1, 1)
    with torch.no_grad():
        emb = pipe.projection(pipe.text_states(prompts))
        neg = pipe.projection(pipe.text_states([pipe.null_prompt])).expand(n, -1, -1)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return diffusers_ip2p(pipe, unet, scheduler)(
        image=x, prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps,
        guidance_scale=text_scale, image_guidance_scale=image_scale, generator=gens, output_type="np").images


@pytest.mark.parametrize("channels,scheduler", [(1, "ddim"), (1, "dpm"), (1, "euler"), (3, "dpm")])
def test_bmj_pipeline_gives_diffusers_instruct_pix2pix_image(channels, scheduler):
    pipe = rgb_pipeline() if channels == 3 else tiny_pipeline()
    ours = pipe(priors(), PROMPTS, text_scale=7.5, image_scale=1.5, steps=3, scheduler=scheduler, seed=7)
    ref = run_diffusers(pipe, priors(), PROMPTS, 3, scheduler, 7)
    assert ref.shape == (2, 32, 32, channels) and ours.shape == (2, 32, 32)
    # bmj returns one grey image: diffusers' per-channel [0,1] image averaged over its channels
    assert np.abs(ours - ref.mean(-1)).max() <= 1e-5
    assert ours.std() > 0.01 and np.abs(ours[0] - ours[1]).max() > 0.01  # not trivially equal
    # the old convention (prior latent x scaling_factor) gives another image: the comparison can fail
    pipe.prior_latents = "scaled"
    old = pipe(priors(), PROMPTS, text_scale=7.5, image_scale=1.5, steps=3, scheduler=scheduler, seed=7)
    assert np.abs(old - ref.mean(-1)).max() > 1e-3


def test_rgb_output_is_clamped_per_channel_before_averaging():
    """An RGB VAE's channels are clamped to [0,1] first, then averaged (diffusers' order); averaging first
    would let an out-of-range channel cancel another."""
    pipe = rgb_pipeline()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert ((x < -1) | (x > 1)).any()  # some channel values are out of range, so the order matters
    expected = (x * 0.5 + 0.5).clamp(0, 1).mean(1, keepdim=True)
    got = pipe.decode_latents(z)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - ((x.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)).abs().max() > 1e-3


def test_prior_latent_is_the_unscaled_posterior_mode():
    pipe = tiny_pipeline()
    x = to_batch(priors(), 32)
    with torch.no_grad():
        mode = pipe.vae.encode(x * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(pipe.encode_prior(x), mode, rtol=0, atol=0)
    torch.testing.assert_close(pipe.encode_images(x), mode * pipe.vae.config.scaling_factor, rtol=0, atol=0)
    assert pipe.vae.config.scaling_factor != 1.0


def _save_unet(unet, folder, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # random, not the default init, so a weight copied from elsewhere would show
        for p in unet.parameters():
            p.normal_(0, 0.05)
    unet.save_pretrained(folder)
    return UNet2DConditionModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("in_channels", [8, 4])
def test_ip2p_and_sd15_unet_checkpoints_initialise_the_bmj_unet(tmp_path, in_channels):
    """An InstructPix2Pix-style checkpoint (8 input channels) is used as is; a Stable Diffusion v1.5-style one
    (4) is widened with zero weights on the prior's channels. Either way bmj then samples what diffusers'
    InstructPix2Pix pipeline samples with that UNet."""
    saved = _save_unet(build_unet(TINY_UNET, in_channels=in_channels), tmp_path / "unet", seed=in_channels)
    parts = tiny_pipeline()
    pipe = T.init_pipeline(vae=parts.vae, text_encoder=tiny_text_encoder(), image_size=32,
                           unet_init=str(tmp_path / "unet"))
    assert pipe.unet.config.in_channels == 8 and pipe.prior_latents == "unscaled"
    mine, theirs = pipe.unet.state_dict(), saved.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        if k != "conv_in.weight":
            assert torch.equal(mine[k], theirs[k]), k
    w = mine["conv_in.weight"]
    assert torch.equal(w[:, :in_channels], theirs["conv_in.weight"])
    assert in_channels == 8 or float(w[:, in_channels:].abs().max()) == 0.0
    ours = pipe(priors(), PROMPTS, steps=2, scheduler="ddim", seed=3)
    ref = run_diffusers(pipe, priors(), PROMPTS, 2, "ddim", 3, unet=pipe.unet)
    assert np.abs(ours - ref[..., 0]).max() <= 1e-5


def test_model_folder_records_the_convention(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "bmj_pipeline.json").read_text())
    assert meta["prior_latents"] == "unscaled"
    new = BiomedJourneyPipeline.from_pretrained(tmp_path / "m")
    assert new.prior_latents == "unscaled"
    np.testing.assert_array_equal(new(priors(), PROMPTS, steps=2, seed=1), pipe(priors(), PROMPTS, steps=2, seed=1))
    # a folder written before the convention was recorded samples as it was trained: scaled prior latents
    del meta["prior_latents"]
    (tmp_path / "m" / "bmj_pipeline.json").write_text(json.dumps(meta))
    old = BiomedJourneyPipeline.from_pretrained(tmp_path / "m")
    assert old.prior_latents == "scaled"
    torch.testing.assert_close(old.encode_prior(priors()), old.encode_images(priors()), rtol=0, atol=0)
    pipe.prior_latents = "scaled"
    np.testing.assert_array_equal(old(priors(), PROMPTS, steps=2, seed=1), pipe(priors(), PROMPTS, steps=2, seed=1))
    meta["prior_latents"] = "halved"
    (tmp_path / "m" / "bmj_pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="bmj_pipeline.json has prior_latents 'halved'; expected one of "
                                               "unscaled, scaled"):
        BiomedJourneyPipeline.from_pretrained(tmp_path / "m")
