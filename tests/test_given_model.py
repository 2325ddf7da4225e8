"""The profile's `model:` setting: a trained model used instead of training (notebooks 04-05), what 06-10 then
read, and the judges a cohort without labels gets (bmjlib.model.stages, bmjlib.evaluation.judges)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from bmjlib.chain import sampler_settings
from bmjlib.evaluation import counterfactuals as C
from bmjlib.evaluation import judges as J
from bmjlib.model import stages
from bmjlib.model.pipeline import read_guidance
from bmjlib.schema import FINDINGS

from test_pipeline import shift_decoder, tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("given") / "model"
    tiny_pipeline().save_pretrained(d)
    (d / "guidance.json").write_text(json.dumps({"text_scale": 3.0, "image_scale": 2.5}))
    return d


def test_model_setting_names_a_saved_model_or_nothing(model, tmp_path):
    assert stages.given_model("") is None and stages.given_model("  ") is None
    assert stages.given_model(str(model)) == model
    assert (stages.given_model("demo") / "bmj_pipeline.json").is_file()  # the shipped model, expanded
    with pytest.raises(FileNotFoundError, match=r"model: '.*nowhere'.*does not exist"):
        stages.given_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no bmj_pipeline.json"):
        stages.given_model(str(tmp_path / "empty"))


def test_04_trains_nothing_and_05_puts_the_model_where_06_10_read_it(model, tmp_path):
    run = tmp_path / "run"
    note = stages.skip_stage1(run, str(model), log=lambda *_: None)
    assert note["guidance"] == [3.0, 2.5] and "not trained" in note["what"]
    assert sorted(p.name for p in (run / "04_stage1").iterdir()) == ["given_model.json"]  # nothing heavy

    assert stages.model_run(run) is None
    got = stages.use_given_model(run, str(model), log=lambda *_: None)
    assert got == run / "05_stage2" / "model"
    assert (got / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert read_guidance(got) == (3.0, 2.5)
    # guidance "auto" of notebooks 06-09 is the model's own
    assert sampler_settings(run, "dpm", 4, "auto", "auto", 0.7) == dict(steps=4, scheduler="dpm", text_scale=3.0,
                                                                         image_scale=2.5, strength=0.7,
                                                                         output="decoded", text_guidance_min_t=0.0,
                                                                         edit_mask=0.0)
    assert stages.model_run(run)["model"] == str(model)
    specs = C.model_specs(run)
    assert (specs["biomedjourney"]["path"] / "bmj_pipeline.json").is_file()
    assert not (specs["one_stage"]["path"] / "bmj_pipeline.json").exists()  # no one-stage arm in a model run

    stamp = (got / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    stages.use_given_model(run, str(model), log=lambda *_: None)  # a rerun copies nothing
    assert (got / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_a_given_model_with_a_new_decoder_is_copied_again(tmp_path):
    # the same UNet under a fine-tuned VAE decoder is another model: 05_stage2/model must take the new VAE
    src = tmp_path / "model"
    tiny_pipeline().save_pretrained(src)
    run = tmp_path / "run"
    got = stages.use_given_model(run, str(src), log=lambda *_: None)
    vae = (src / "vae" / "diffusion_pytorch_model.safetensors")
    shutil.copy(vae, tmp_path / "old_vae")
    shift_decoder(src)
    assert vae.read_bytes() != (tmp_path / "old_vae").read_bytes()
    stages.use_given_model(run, str(src), log=lambda *_: None)
    assert (got / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae.read_bytes()


def test_a_model_without_guidance_file_gets_instructpix2pixs_written_down(model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    (plain / "guidance.json").unlink()
    got = stages.use_given_model(tmp_path / "run", str(plain), log=lambda *_: None)
    assert read_guidance(got) == (7.5, 1.5) and "InstructPix2Pix" in json.loads((got / "guidance.json").read_text())["criterion"]


def _pairs(run, labelled: bool):
    cols = {f"{w}_{f}": [1.0 if labelled and f == "Edema" else np.nan] * 2 for w in ("prior", "followup")
            for f in FINDINGS}
    (run / "01_cohort").mkdir(parents=True)
    pd.DataFrame({"pair_id": ["a", "b"], "subject_id": ["1", "2"], "split": ["train", "test"], **cols}).to_csv(
        run / "01_cohort" / "pairs.csv", index=False)


def test_a_cohort_without_labels_gets_no_label_judges(tmp_path, capsys):
    _pairs(tmp_path / "with", True)
    _pairs(tmp_path / "without", False)
    assert not J.label_free_cohort(tmp_path / "with") and J.label_free_cohort(tmp_path / "without")
    d = J.judges_dir(tmp_path / "without")
    d.mkdir(parents=True)
    (d / J.SKIPPED_FILE).write_text(json.dumps({"skipped": list(J.LABEL_JUDGES)}))
    anatomy = J.AnatomyJudge(32, 4)
    anatomy.save(d / "anatomy")
    judges = J.load_judges(d)
    assert [k for k, v in judges.items() if v is None] == ["finding", "sex", "age", "severity"]
    assert isinstance(judges["anatomy"], J.AnatomyJudge)
    held = J.heldout_table(judges)
    assert list(held["judge"]) == ["finding", "sex", "age", "anatomy", "severity"]
    assert held["note"].iloc[0].startswith("not trained")


def test_a_missing_judge_predicts_nan_never_zero():
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    assert np.isnan(J.predict(None, x, "finding")).all() and J.predict(None, x, "finding").shape == (3, 5)
    assert np.isnan(J.predict(None, x, "sex")).all() and J.predict(None, x, "age").shape == (3,)
    masks = J.predict(None, x, "anatomy")
    assert masks.shape == (3, 6, 16, 16) and masks.dtype == bool and not masks.any()
    from bmjlib.evaluation.metrics import mean_dice
    assert np.isnan(mean_dice(masks, masks)).all()  # empty masks: Dice undefined, not 1
