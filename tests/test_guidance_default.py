"""One default guidance per model: the pipeline call, `bmj generate` and the explorer sample with the scales of the
model's guidance.json (else InstructPix2Pix's 7.5 / 1.5) when none are given, and so make the same image."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bmjlib.app import explorer as E
from bmjlib.cli import main
from bmjlib.io import read_pixels, to_uint8
from bmjlib.model.pipeline import (IP2P_GUIDANCE, BiomedJourneyPipeline, ModelFolderError, read_edit_mask, read_guidance,
                                   read_strength, read_text_guidance_min_t)

from test_pipeline import tiny_pipeline

PROMPT = "New moderate left pleural effusion."
STEPS, SEED = 3, 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same weights twice: without guidance.json, and with scales chosen for it (text 2, image 2.5)."""
    d = tmp_path_factory.mktemp("guidance")
    plain = tiny_pipeline().save_pretrained(d / "plain")
    chosen = d / "chosen"
    shutil.copytree(plain, chosen)
    (chosen / "guidance.json").write_text(json.dumps({"text_scale": 2.0, "image_scale": 2.5}))
    return plain, chosen


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A 32 px prior (the tiny model's size: no resizing anywhere) holding 0 and 255, so read_image gives
    exactly pixels / 255 to every path."""
    yy, xx = np.mgrid[:32, :32]
    known = np.clip(128 + 127 * np.sin(xx / 4.0) * np.cos(yy / 6.0), 0, 255).astype(np.uint8)
    known[0, 0], known[0, 1] = 0, 255
    path = tmp_path_factory.mktemp("prior") / "prior.png"
    Image.fromarray(known).save(path)
    return path, known.astype(np.float32) / 255


def test_the_model_folder_decides_the_default(folders):
    plain, chosen = folders
    assert read_guidance(plain) == IP2P_GUIDANCE == (7.5, 1.5)
    assert read_guidance(chosen) == (2.0, 2.5)
    assert BiomedJourneyPipeline.from_pretrained(chosen).guidance == (2.0, 2.5)
    assert BiomedJourneyPipeline.from_pretrained(plain).guidance == (7.5, 1.5)
    assert tiny_pipeline().guidance == (7.5, 1.5)  # built in memory: no folder, InstructPix2Pix's


def test_pipe_cli_and_explorer_make_the_same_image_without_scales(folders, prior, tmp_path):
    _, chosen = folders
    path, image = prior
    pipe = BiomedJourneyPipeline.from_pretrained(chosen)
    api = pipe(image, PROMPT, steps=STEPS, seed=SEED)[0]
    # the default is the model's chosen scales, not InstructPix2Pix's: the two differ, so the test can fail
    assert np.array_equal(api, pipe(image, PROMPT, text_scale=2.0, image_scale=2.5, steps=STEPS, seed=SEED)[0])
    assert np.abs(api - pipe(image, PROMPT, text_scale=7.5, image_scale=1.5, steps=STEPS, seed=SEED)[0]).max() > 1e-2

    out = tmp_path / "cf.png"
    assert main(["generate", "--model", str(chosen), "--prior", str(path), "--prompt", PROMPT, "--out", str(out),
                 "--steps", str(STEPS), "--seed", str(SEED)]) == 0
    cli = read_pixels(out)
    assert cli.shape == api.shape
    assert np.abs(cli - to_uint8(api).astype(np.float32)).max() <= 1  # 8-bit PNG of the same image

    app = E.Explorer(model=str(chosen), interpreter=None)
    assert (app.text_scale.value, app.image_scale.value) == (2.0, 2.5)  # the sliders start at the model's
    app.source.value, app.path.value, app.prompt.value = "file", str(path), PROMPT
    app.steps.value, app.seed.value = STEPS, SEED
    app.start([PROMPT]).join(120)
    assert app.status.value.startswith("done: 1 image"), app.status.value
    np.testing.assert_allclose(app.result[0], api, rtol=0, atol=1e-5)  # float reduction order aside
    np.testing.assert_allclose(E.sample(pipe, image, [PROMPT], steps=STEPS, seed=SEED)[0], api, rtol=0, atol=1e-5)


def test_explicit_scales_still_win(folders, prior):
    plain, chosen = folders
    _, image = prior
    a = BiomedJourneyPipeline.from_pretrained(chosen)(image, PROMPT, text_scale=7.5, image_scale=1.5, steps=2)
    b = BiomedJourneyPipeline.from_pretrained(plain)(image, PROMPT, steps=2)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content,needle", [('{"text_scale": 2', "guidance.json is not valid JSON"),
                                            ('{"text_scale": -1, "image_scale": 1}', "guidance.json is unusable"),
                                            ('{"text_scale": 1}', "guidance.json has no 'image_scale'"),
                                            ('{"text_scale": 1, "image_scale": 1, "settings": {"strength": 2}}',
                                             r"settings.strength 2.0 is not in \(0, 1\]"),
                                            ('{"text_scale": 1, "image_scale": 1, "settings": {"strength": "x"}}',
                                             "settings.strength is unusable"),
                                            ('{"text_scale": 1, "image_scale": 1, "settings": {"text_guidance_min_t": 1.5}}',
                                             r"guidance.json settings.text_guidance_min_t 1.5 is not allowed"),
                                            ('{"text_scale": 1, "image_scale": 1, "settings": {"edit_mask": -2}}',
                                             r"guidance.json settings.edit_mask -2 is not allowed")])
def test_a_damaged_guidance_file_is_named_by_the_loader(folders, tmp_path, content, needle):
    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad)
    (bad / "guidance.json").write_text(content)
    with pytest.raises(ModelFolderError, match=needle):
        BiomedJourneyPipeline.from_pretrained(bad)


def test_the_sampling_strength_chosen_with_the_scales_is_the_default(folders, prior, tmp_path):
    plain, chosen = folders
    assert read_strength(plain) == read_strength(chosen) == 1.0  # none recorded: from pure noise
    strong = tmp_path / "strong"
    shutil.copytree(plain, strong)
    (strong / "guidance.json").write_text(json.dumps({"text_scale": 2.0, "image_scale": 2.5,
                                                      "settings": {"scheduler": "dpm", "steps": 20, "strength": 0.6}}))
    pipe = BiomedJourneyPipeline.from_pretrained(strong)
    assert pipe.strength == read_strength(strong) == 0.6
    image = prior[1]
    out = pipe(image, PROMPT, steps=STEPS + 2, seed=SEED)[0]
    assert np.array_equal(out, pipe(image, PROMPT, steps=STEPS + 2, seed=SEED, strength=0.6)[0])
    assert np.abs(out - pipe(image, PROMPT, steps=STEPS + 2, seed=SEED, strength=1.0)[0]).max() > 1e-2


@pytest.mark.parametrize("key,value,read", [("text_guidance_min_t", 0.5, read_text_guidance_min_t),
                                             ("edit_mask", 2.0, read_edit_mask)])
def test_the_sampler_settings_chosen_with_the_scales_are_the_defaults(folders, prior, tmp_path, key, value, read):
    """A model folder's guidance.json settings.text_guidance_min_t / settings.edit_mask are the pipeline's defaults; a
    folder that records none samples as the paper (0)."""
    plain, chosen = folders
    assert read(plain) == read(chosen) == 0.0  # none recorded
    own = tmp_path / "own"
    shutil.copytree(plain, own)
    (own / "guidance.json").write_text(json.dumps({"text_scale": 4.0, "image_scale": 1.5,
                                                   "settings": {"strength": 1.0, key: value}}))
    pipe = BiomedJourneyPipeline.from_pretrained(own)
    assert getattr(pipe, key) == read(own) == value
    image = prior[1]
    out = pipe(image, PROMPT, steps=STEPS + 3, seed=SEED)[0]
    assert np.array_equal(out, pipe(image, PROMPT, steps=STEPS + 3, seed=SEED, **{key: value})[0])
    assert np.abs(out - pipe(image, PROMPT, steps=STEPS + 3, seed=SEED, **{key: 0.0})[0]).max() > 1e-3
