"""The counterfactual explorer's logic, without a browser (see test_explorer_browser.py)."""
import io

import numpy as np
import pytest
from PIL import Image

from bmjlib.app import explorer as E


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bmjlib.bench.steps import random_pipeline

    d = tmp_path_factory.mktemp("model") / "model"
    random_pipeline(64).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    from bmjlib.model.pipeline import BiomedJourneyPipeline

    return BiomedJourneyPipeline.from_pretrained(model_dir)


def _png_size(data: bytes):
    return Image.open(io.BytesIO(data)).size


def test_sample_with_progress_is_the_pipelines_own_sampling(pipe):
    prior = E.phantom_prior(3, size=128).image
    prompts = ["New small left pleural effusion.", "Resolved right pneumothorax."]
    steps = []
    ours = E.sample(pipe, prior, prompts, 7.5, 1.5, steps=4, seed=11, callback=lambda k, n: steps.append((k, n)))
    ref = pipe(prior, prompts, text_scale=7.5, image_scale=1.5, steps=4, scheduler="dpm", seed=11)
    assert ours.shape == (2, 64, 64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # same computation (float reduction order aside)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_sweep_prompts_follow_the_training_wording():
    assert E.sweep_prompts("Pleural Effusion", "right") == [
        "New small right pleural effusion.", "New moderate right pleural effusion.", "New large right pleural effusion."]
    assert E.sweep_prompts("Cardiomegaly") == ["New mild cardiomegaly.", "New moderate cardiomegaly.",
                                               "New severe cardiomegaly."]
    with pytest.raises(ValueError, match="unknown finding 'Fracture'"):
        E.sweep_prompts("Fracture")


def test_priors_phantom_with_true_masks_and_real_with_attribution():
    p = E.phantom_prior(3, size=128)
    assert p.image.shape == (128, 128) and p.image.dtype == np.float32 and p.image.std() > 0.05
    assert set(p.masks) >= {"left_lung", "right_lung", "heart"} and p.masks["left_lung"].any()
    assert E.phantom_prior(3, size=128).image.tobytes() == p.image.tobytes()  # deterministic
    # the prior's findings, as its caption says them, go to the interpretation with it
    assert "effusion 1" in p.label and p.labels["Pleural Effusion"] == 1.0
    clean = E.phantom_prior(7, size=128)
    assert "no findings" in clean.label and set(clean.labels.values()) == {0.0}

    class Spy:
        def interpret(self, ev, labels):
            self.labels = labels
            return [{"finding": "Pleural Effusion", "direction": "unchanged", "side": "", "measure": ""}]
    spy = Spy()
    assert E.describe_change(clean.image, clean.image, clean.masks, spy, clean.labels) == \
        "No visible change in pleural effusion."
    assert spy.labels is clean.labels
    reals = E.real_images()
    if not reals:
        pytest.skip("../shared/real_cxr/hannover is not beside the repository")
    r = E.real_prior(reals[0][1])
    assert "CC BY 3.0" in r.attribution and "Hannover" in r.attribution and r.masks is None


def test_heatmap_is_red_where_the_counterfactual_is_more_opaque():
    prior = np.full((64, 64), 0.4, np.float32)
    cf = prior.copy()
    cf[40:56, 8:24] += 0.3  # a new opacity, lower image-left
    rgb = E.heatmap_rgb(prior, cf).astype(int)
    assert rgb[48, 16, 0] > rgb[48, 16, 2] + 50 and rgb[48, 16, 1] < 60   # (dark) red inside
    assert abs(rgb[10, 50, 0] - rgb[10, 50, 2]) < 30             # neutral far away
    text = E.describe_change(prior, cf, None)
    assert "No organ masks" in text


def test_widgets_generate_in_a_thread_and_show_the_images(model_dir):
    app = E.Explorer(model=str(model_dir), phantom_size=128, interpreter=None)
    app.load_prior()
    assert _png_size(app.img_prior.value) == (128, 128)
    app.steps.value = 3
    app.start([app.prompt.value]).join(120)
    assert app.status.value.startswith("done: 1 image"), app.status.value
    assert _png_size(app.img_cf.value) == (64, 64) and _png_size(app.img_diff.value) == (64, 64)
    assert app.progress.value == 3 and app.progress.max == 3
    assert "What changed" in app.interpretation.value and not app.go.disabled
    app.start(E.sweep_prompts("Pneumothorax", "left"), sweep=True).join(120)
    assert len(app.sweep_box.children) == 4  # prior + small / moderate / large


def test_the_app_generates_what_the_pipeline_generates_for_its_settings(model_dir, pipe, tmp_path):
    """Prior file, description, both guidance scales, steps and seed set through the widgets: the app's
    counterfactual is the pipeline's, called directly with the same inputs (prior built here, not by the app)."""
    yy, xx = np.mgrid[:96, :96]
    known = np.clip(128 + 127 * np.sin(xx / 7.0) * np.cos(yy / 11.0), 0, 255).astype(np.uint8)
    known[0, 0], known[0, 1] = 0, 255  # read_image scales by the image's own range: exactly known / 255
    Image.fromarray(known).save(tmp_path / "prior.png")
    app = E.Explorer(model=str(model_dir), interpreter=None)
    app.source.value, app.path.value = "file", str(tmp_path / "prior.png")
    app.prompt.value = "Resolved right pneumothorax."
    app.text_scale.value, app.image_scale.value, app.steps.value, app.seed.value = 3.5, 2.2, 3, 7
    app.start([app.prompt.value]).join(120)
    assert app.status.value.startswith("done: 1 image"), app.status.value
    ref = pipe(known.astype(np.float32) / 255, "Resolved right pneumothorax.", text_scale=3.5, image_scale=2.2,
               steps=3, scheduler="dpm", seed=7)
    np.testing.assert_allclose(app.result, ref, rtol=0, atol=1e-5)  # float reduction order aside
    other = pipe(known.astype(np.float32) / 255, "Resolved right pneumothorax.", text_scale=3.5, image_scale=2.2,
                 steps=3, scheduler="dpm", seed=8)
    assert np.abs(app.result - other).max() > 1e-3  # the seed matters, so the comparison above can fail


def test_a_bad_prior_file_is_named_in_the_app(model_dir, tmp_path):
    app = E.Explorer(model=str(model_dir), interpreter=None)
    app.source.value = "file"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    app.path.value = str(bad)
    with pytest.raises(Exception):
        app.load_prior()
    assert "broken.png" in app.status.value


@pytest.mark.parametrize("widget,value,msg", [("text_scale", float("nan"), "text scale nan is not allowed"),
                                              ("image_scale", float("nan"), "image scale nan is not allowed"),
                                              ("seed", -3, "seed -3 is not allowed")])
def test_the_app_refuses_settings_the_pipeline_refuses(model_dir, widget, value, msg):
    """A slider does not stop NaN (NaN passes its min/max comparison): the app names it and generates nothing."""
    app = E.Explorer(model=str(model_dir), phantom_size=64, interpreter=None)
    before = app.img_cf.value
    getattr(app, widget).value = value
    app.start([app.prompt.value]).join(120)
    assert app.status.value.startswith("<b") and f"not generated: {msg}" in app.status.value
    assert app.result is None and app.img_cf.value == before and not app.go.disabled
    assert app.pipe is None  # refused before the model was even loaded


def test_the_sliders_clamp_what_is_out_of_range(model_dir):
    app = E.Explorer(model=str(model_dir), phantom_size=64, interpreter=None)
    app.text_scale.value, app.image_scale.value, app.steps.value = float("inf"), -2.0, 0
    assert (app.text_scale.value, app.image_scale.value, app.steps.value) == (15.0, 0.0, 1)


def test_sample_refuses_steps_outside_1_to_1000(pipe):
    prior = np.full((64, 64), 0.5, np.float32)
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError, match=f"steps {steps} is not allowed: give a whole number from 1 to 1000"):
            E.sample(pipe, prior, ["x"], steps=steps)


def test_the_app_says_when_a_description_is_cut(model_dir):
    app = E.Explorer(model=str(model_dir), phantom_size=64, interpreter=None)
    long_prompt = " ".join(["New large left pleural effusion with mediastinal shift."] * 6)
    kept, total = app.load_model().text_encoder.prompt_tokens(long_prompt)
    assert kept == 48 < total
    app.steps.value = 1
    app.start([long_prompt]).join(120)
    assert app.status.value.startswith("done: 1 image"), app.status.value
    assert f"{kept} of {total} tokens kept" in app.status.value
    app.start(["New small left pleural effusion."]).join(120)
    assert "tokens kept" not in app.status.value


def test_a_damaged_model_folder_is_named_in_the_app(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "unet" / "config.json").write_text("{not json")
    app = E.Explorer(model=str(bad), phantom_size=64, interpreter=None)
    app.start([app.prompt.value]).join(120)
    assert "unet/config.json is not valid JSON" in app.status.value and app.result is None


def test_the_interpreter_is_calibrated_once_per_phantom_truth_and_code(tmp_path, monkeypatch):
    from bmjlib.icg.interpret import Interpreter
    from bmjlib.phantom import cohort as phantom

    monkeypatch.setenv("BMJ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "phantom"
    phantom.write_cohort(root, n_patients=8, size=128, seed=11, workers=1)
    calls = []
    real = E.calibrate_interpreter
    monkeypatch.setattr(E, "calibrate_interpreter", lambda r: calls.append(r) or real(r))
    first = E.cached_interpreter(root)
    assert isinstance(first, Interpreter) and len(calls) == 1
    again = E.cached_interpreter(root)
    assert len(calls) == 1 and type(again) is Interpreter  # read back from the cache
    code = E.code_fingerprint_of
    monkeypatch.setattr(E, "code_fingerprint_of", lambda *m: code(*m) + "-edited")
    E.cached_interpreter(root)
    assert len(calls) == 2  # the calibrating code changed: calibrated again, under a new entry
    assert len(list((tmp_path / "cache").glob("interpreter-*.pkl"))) == 2
    for f in (tmp_path / "cache").glob("interpreter-*.pkl"):
        f.write_bytes(b"not a pickle")
    assert isinstance(E.cached_interpreter(root), Interpreter) and len(calls) == 3  # a damaged entry: again
