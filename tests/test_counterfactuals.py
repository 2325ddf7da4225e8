"""Generation over test pairs: seeded per pair, resumable, copy-prior exact, clear errors (bmjlib.evaluation.counterfactuals)."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from bmjlib.evaluation import counterfactuals as C
from bmjlib.io import read_image
from test_judges import make_fake_run
from test_pipeline import shift_decoder


def fake_model_run(root, n_patients: int, models=("05_stage2/model", "04_stage1/model")):
    """(run, pipeline): a fake run with descriptions (step 03) and a tiny random pipeline saved as each model."""
    from test_pipeline import tiny_pipeline

    run = make_fake_run(root, n_patients=n_patients)
    (run / "03_descriptions").mkdir()
    shutil.copy(run / "01_cohort" / "pairs.csv", run / "03_descriptions" / "pairs.csv")
    pipe = tiny_pipeline()
    for m in models:
        pipe.save_pretrained(run / m)
    return run, pipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_model_run(tmp_path_factory.mktemp("cf"), 15)[0]


def test_copy_prior_is_the_resized_prior(run, tmp_path):
    pairs = C.test_pairs(run)
    assert len(pairs) == 3 and list(pairs["pair_id"]) == sorted(pairs["pair_id"])
    idx = C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, tmp_path, size=32)
    assert len(idx) == 3
    for pid, prior in zip(pairs["pair_id"], pairs["prior_path"]):
        assert np.abs(read_image(tmp_path / "copy_prior" / f"{pid}.png") - read_image(prior)).max() <= 1 / 255 + 1e-6


def test_pipeline_generation_is_seeded_per_pair_and_resumable(run, tmp_path):
    pairs = C.test_pairs(run)
    spec = C.model_specs(run)["biomedjourney"]
    settings = {"steps": 2}
    C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=3, batch_size=2, settings=settings)
    d = tmp_path / "biomedjourney"
    first = {p: (d / f"{p}.png").read_bytes() for p in pairs["pair_id"]}
    mtimes = {p: (d / f"{p}.png").stat().st_mtime_ns for p in pairs["pair_id"]}
    # rerun: nothing is made again
    C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=3, batch_size=2, settings=settings)
    assert all((d / f"{p}.png").stat().st_mtime_ns == mtimes[p] for p in pairs["pair_id"])
    # lose the middle one: only it is regenerated, in a batch of its own, and comes out the same up to float
    # reduction order (a batch of 1 vs 2 sums in another order: at most one grey level, seen on 2 idle threads)
    mid = pairs["pair_id"][1]
    before = read_image(d / f"{mid}.png")
    (d / f"{mid}.png").unlink()
    idx = C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=3, batch_size=2, settings=settings)
    assert np.abs(read_image(d / f"{mid}.png") - before).max() <= 1 / 255 + 1e-6
    assert (d / f"{pairs['pair_id'][0]}.png").stat().st_mtime_ns == mtimes[pairs["pair_id"][0]]
    assert list(idx["seed"]) == [3, 4, 5] and (d / "index.csv").is_file()
    # a different seed or setting makes different work
    C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=9, batch_size=2, settings=settings)
    assert (d / f"{mid}.png").read_bytes() != first[mid]


def test_a_change_to_the_samplers_code_regenerates(run, tmp_path, monkeypatch):
    pairs = C.test_pairs(run)
    spec = C.model_specs(run)["biomedjourney"]
    d = tmp_path / "biomedjourney"
    C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=3, batch_size=2, settings={"steps": 2})
    mtimes = {p: (d / f"{p}.png").stat().st_mtime_ns for p in pairs["pair_id"]}
    real = C.code_fingerprint_of
    monkeypatch.setattr(C, "code_fingerprint_of", lambda *m: real(*m) + "-edited")
    C.generate_model("biomedjourney", spec, pairs, tmp_path, size=32, seed=3, batch_size=2, settings={"steps": 2})
    assert all((d / f"{p}.png").stat().st_mtime_ns != mtimes[p] for p in pairs["pair_id"])


def test_a_new_decoder_under_the_same_unet_regenerates(tmp_path):
    # the outputs are keyed on the whole model folder, not the UNet alone: a fine-tuned VAE decoder (same UNet, same
    # latents) must make every output again; a documentation edit must not
    run, _ = fake_model_run(tmp_path / "run", 15, models=("05_stage2/model",))
    pairs = C.test_pairs(run)
    spec = C.model_specs(run)["biomedjourney"]
    model, out = spec["path"], tmp_path / "gen"
    d = out / "biomedjourney"
    C.generate_model("biomedjourney", spec, pairs, out, size=32, seed=3, batch_size=2, settings={"steps": 2})
    mtimes = {p: (d / f"{p}.png").stat().st_mtime_ns for p in pairs["pair_id"]}
    (model / "MODEL_CARD.md").write_text("# card\n")
    C.generate_model("biomedjourney", spec, pairs, out, size=32, seed=3, batch_size=2, settings={"steps": 2})
    assert all((d / f"{p}.png").stat().st_mtime_ns == mtimes[p] for p in pairs["pair_id"])
    unet = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    shift_decoder(model)
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet
    C.generate_model("biomedjourney", spec, pairs, out, size=32, seed=3, batch_size=2, settings={"steps": 2})
    assert all((d / f"{p}.png").stat().st_mtime_ns != mtimes[p] for p in pairs["pair_id"])


def test_text_only_ignores_the_prior(run, tmp_path):
    pairs = C.test_pairs(run)
    spec = C.model_specs(run)["text_only"]
    assert spec["prior"] == "dummy" and spec["text"] == "instruction_impression"
    gen = C.load_generator("text_only", spec)
    a = gen(np.zeros((1, 32, 32)), ["effusion"], 0, steps=2)
    b = gen(np.ones((1, 32, 32)), ["effusion"], 0, steps=2)
    assert np.array_equal(a, b)
    # no prior to add a change to: a profile's prior_plus_change leaves the text-only arm decoded
    c = gen(np.ones((1, 32, 32)), ["effusion"], 0, steps=2, output="prior_plus_change")
    assert np.array_equal(a, c)
    # nor a prior to keep outside an edit mask: a profile's edit_mask leaves the text-only arm as it is
    assert np.array_equal(a, gen(np.ones((1, 32, 32)), ["effusion"], 0, steps=2, edit_mask=3.0))
    spec = C.model_specs(run)["biomedjourney"]  # a model with a prior does take it
    gen = C.load_generator("biomedjourney", spec)
    prior = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    assert not np.array_equal(gen(prior, ["effusion"], 0, steps=2, strength=0.5),
                              gen(prior, ["effusion"], 0, steps=2, strength=0.5, output="prior_plus_change"))


def test_missing_models_are_named(run, tmp_path):
    specs = C.model_specs(run, scale="paper", sd_dir=str(tmp_path / "sd"))
    with pytest.raises(C.ModelMissing, match="one_stage.*not a saved BiomedJourney pipeline"):
        C.check_model("one_stage", specs["one_stage"])
    with pytest.raises(C.ModelMissing, match=r"Stable Diffusion v1.5 weights at .*sd.*model_index.json"):
        C.check_model("sd15", specs["sd15"])
    with pytest.raises(C.ModelMissing, match="no folder given"):
        C.check_model("ip2p", specs["ip2p"])
    summary = C.generate_all(run, tmp_path / "g", models=["one_stage", "copy_prior"], size=32, skip_missing=True)
    assert summary.set_index("model").loc["one_stage", "status"].startswith("missing")
    assert summary.set_index("model").loc["copy_prior", "n_generated"] == 3


def test_corrupt_prior_is_skipped_and_counted(run, tmp_path):
    pairs = C.test_pairs(run).copy()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    pairs.loc[0, "prior_path"] = str(bad)
    idx = C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, tmp_path, size=32)
    assert len(idx) == 2
    sk = pd.read_csv(tmp_path / "copy_prior" / "skipped.csv")
    assert len(sk) == 1 and "bad.jpg" in sk["problem"][0]


def test_no_test_pairs_is_an_error(run, tmp_path):
    with pytest.raises(ValueError, match="no 'nope' pairs"):
        C.test_pairs(run, split="nope")


def untrained_judges():
    import torch

    from bmjlib.evaluation import judges as J
    torch.manual_seed(0)
    return {"finding": J.FindingJudge(32, 4), "sex": J.SexJudge(32, 4), "age": J.AgeJudge(32, 4),
            "anatomy": ThresholdSegmenter(), "severity": J.SeverityJudge(32, 4)}


class ThresholdSegmenter:
    """A deterministic stand-in anatomy judge: organ k = pixels brighter than 0.2 + 0.08 k."""
    def predict(self, images):
        x = np.asarray(images)
        return np.stack([x > 0.2 + 0.08 * k for k in range(6)], axis=1)


def test_evaluate_known_identities_and_tables(run, tmp_path):
    """Whatever the judges, the reference against itself has KL 0 and Dice 1; copying the prior keeps the
    prior's segmentation; every summary number has an interval; the tables render."""
    from bmjlib.evaluation import evaluate as E
    from bmjlib.evaluation import tables as T
    pairs = C.test_pairs(run)
    C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, tmp_path, size=32)
    summary, per_pair = E.evaluate(run, tmp_path, untrained_judges(), ["copy_prior", "absent_model"], size=32,
                                   n_boot=20, seed=0)
    s = summary.set_index("source")
    assert list(s.index) == ["copy_prior", "reference"]  # a model without outputs is left out
    assert s.loc["reference", "kl"] == pytest.approx(0.0, abs=1e-12)
    assert s.loc["reference", "dice_vs_reference"] == 1.0
    assert 0.95 < s.loc["copy_prior", "dice_vs_prior"] <= 1.0
    assert s.loc["copy_prior", "dice_vs_reference"] < s.loc["copy_prior", "dice_vs_prior"]
    assert "cmig_lo" in s and "pathology_auroc_hi" in s
    assert {"ssim", "ms_ssim", "psnr"} <= set(per_pair)  # the fake run has true counterfactuals
    assert len(T.table1(summary)) == 2 and len(T.table4(summary)) == 2


class _StubVAE:
    """`reconstruct` as a VAE round trip: the identity, or a 3x3 box blur (a VAE that loses fine detail)."""

    def __init__(self, blur: bool):
        self.blur = blur

    def reconstruct(self, images, size):
        from scipy import ndimage
        x = np.asarray(images, np.float32)
        return np.stack([ndimage.uniform_filter(i, 3) for i in x]) if self.blur else x.copy()


def test_evaluate_ceiling_rows_are_the_truth_and_its_vae_round_trip(run, tmp_path):
    """With a VAE, the summary ends with the true counterfactual and the true counterfactual through the VAE: an
    identity VAE scores exactly what the truth scores (and SSIM 1 to it), a blurring one is further from the truth;
    the truth is not scored against itself; the tables name both rows."""
    from bmjlib.evaluation import evaluate as E
    from bmjlib.evaluation import tables as T
    pairs = C.test_pairs(run)
    C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, tmp_path, size=32)
    judges = untrained_judges()
    same, _ = E.evaluate(run, tmp_path, judges, ["copy_prior"], size=32, n_boot=0, vae=_StubVAE(blur=False))
    s = same.set_index("source")
    assert list(s.index) == ["copy_prior", "reference", "truth", "vae_truth"]
    assert np.isnan(s.loc["truth", "ssim"])  # not scored against itself
    assert s.loc["vae_truth", "ssim"] == pytest.approx(1.0)
    cols = ["pathology_auroc", "retention_auroc", "age_r", "cmig", "kl", "dice_vs_prior"]
    np.testing.assert_allclose(s.loc["vae_truth", cols].to_numpy(float), s.loc["truth", cols].to_numpy(float),
                               rtol=1e-6, equal_nan=True)
    blurred, _ = E.evaluate(run, tmp_path, judges, ["copy_prior"], size=32, n_boot=0, vae=_StubVAE(blur=True))
    b = blurred.set_index("source")
    assert b.loc["vae_truth", "ssim"] < 0.99
    assert T.table1(blurred)["Model"].tolist()[-2:] == [T.LABEL["truth"], T.LABEL["vae_truth"]]


def test_figures_write_png_and_pdf(run, tmp_path):
    from bmjlib.evaluation import figures as F
    from bmjlib.model.pipeline import BiomedJourneyPipeline
    pairs = C.test_pairs(run)
    C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, tmp_path, size=32)
    pair = F.pick_pair(pairs)
    j = untrained_judges()
    pipe = BiomedJourneyPipeline.from_pretrained(run / "05_stage2" / "model")
    prior = read_image(pair["prior_path"])
    F.model_row(run, tmp_path, pair, ["copy_prior"], tmp_path / "f", name="fig4")
    F.fig5(run, tmp_path, pair, ["copy_prior"], j["anatomy"], tmp_path / "f", size=32)
    assert F.overlay_masks(np.zeros((4, 4)), np.ones((6, 4, 4), bool)).shape == (4, 4, 3)
    F.fig3(pipe, j["finding"], prior, tmp_path / "f", settings={"steps": 1})
    _, sweep = F.fig9(pipe, prior, fig_dir=tmp_path / "f", settings={"steps": 1}, finding_judge=j["finding"],
                      severity_judge=j["severity"])
    assert sweep.shape == (3, 32, 32)
    names = {p.name for p in (tmp_path / "f").iterdir()}
    for n in ("fig4", "fig5_segmentations", "fig3_counterfactuals_attention", "fig9_severity_sweep"):
        assert {f"{n}.png", f"{n}.pdf"} <= names


def test_resolve_guidance_reads_the_choice_and_passes_numbers(tmp_path):
    """"auto" reads notebook 05's choice (validity.select_guidance writes it; tested in test_validity)."""
    import json
    f = tmp_path / "05_stage2" / "guidance" / C.GUIDANCE_FILE
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"text_scale": 4.5, "image_scale": 2.5}))
    assert C.resolve_guidance(tmp_path, "auto", "auto") == (4.5, 2.5)
    assert C.resolve_guidance(tmp_path, 3, "auto") == (3.0, 2.5)
    assert C.resolve_guidance(tmp_missing := tmp_path / "nonexistent", 7.5, 1.5) == (7.5, 1.5)
    with pytest.raises(FileNotFoundError, match="guidance.json.*notebook 05"):
        C.resolve_guidance(tmp_missing, "auto", 1.5)
    with pytest.raises(ValueError, match="'fast': a number or 'auto'"):
        C.resolve_guidance(tmp_path, "fast", 1.5)
