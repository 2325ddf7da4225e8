"""Counterfactual validity (bmjlib.evaluation.validity): known answers on the phantom's own renders and on a
small run folder: copying has effectiveness 0 and change error 1, the truth change error 0, a change on the
wrong side loses laterality-aware effectiveness, noise loses preservation but not effectiveness, the physical
measures recover the phantom's grades, truth-less runs leave the truth columns empty, the guidance rule."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from bmjlib.evaluation import counterfactuals as C
from bmjlib.evaluation import metrics as M
from bmjlib.evaluation import validity as V
from bmjlib.io import atomic_write_png, read_image, read_pixels, resize_image, to_uint8
from bmjlib.phantom.anatomy import render
from bmjlib.phantom.body import image_ctr
from bmjlib.phantom.cohort import plan_patient, state_from_record
from bmjlib.schema import FINDINGS, ORGANS
from bmjlib.text.progression import describe_change, null_description
from test_counterfactuals import ThresholdSegmenter, fake_model_run
from test_judges import BLOB

SIZE = 64
EFF = FINDINGS.index("Pleural Effusion")


# --------------------------------------------------------------------------- the phantom's own renders

def phantom(index: int, changes: dict, size: int = 256):
    """(image in [0,1], masks organs x H x W, true CTR) of patient `index`'s first image with `changes`."""
    plan = plan_patient(0, index, size)
    st, im = plan["studies"][0], plan["studies"][0]["images"][0]
    s = state_from_record(st["state"])
    for k, (g, side) in changes.items():
        s.sev[k], s.side[k] = g, side
    img, masks = render(plan["patient"], s, im["pose"], im["exposure"], view=im["view_true"], size=size,
                        noise_seed=im["noise_seed"], devices=st["devices"], masks=True)
    return img / 255.0, np.stack([masks[o] for o in ORGANS]), image_ctr(plan["patient"], s, im["view_true"])


class SideBlindJudge:
    """A known-answer finding judge that cannot tell sides: pleural effusion = the larger opaque fraction of the
    two lungs of fixed masks (the prior's: outputs stay in its frame); other findings 0."""
    def __init__(self, masks):
        self.masks = masks[None]

    def predict(self, images):
        x = np.asarray(images, float)
        m = np.repeat(self.masks, len(x), 0)
        out = np.zeros((len(x), len(FINDINGS)))
        out[:, EFF] = np.maximum(V.opaque_fraction(x, m, "left"), V.opaque_fraction(x, m, "right"))
        return out


@pytest.fixture(scope="module")
def effusion_case():
    """A patient without effusion (prior) and the truth with a new large LEFT effusion, at 64 px."""
    prior, masks, _ = phantom(8, {"effusion": (0, "")})
    truth, _, _ = phantom(8, {"effusion": (3, "left")})
    small = resize_image(np.stack([masks.astype(np.float32)]).reshape(-1, 256, 256), SIZE).reshape(6, SIZE, SIZE)
    return resize_image(prior, SIZE)[None], resize_image(truth, SIZE)[None], small > 0.5


def test_the_change_region_is_where_the_truth_differs(effusion_case):
    prior, truth, _ = effusion_case
    region = V.changed_region(prior, truth)
    assert region.any() and not V.changed_region(prior, prior).any()
    raw = np.abs(truth - prior) > V.REGION_THRESHOLD
    assert (region | ~raw).all() and region.sum() > raw.sum()  # dilated, never shrunk
    # the new effusion is in the patient's left = the image's right half
    assert region[0][:, SIZE // 2:].sum() > 5 * region[0][:, :SIZE // 2].sum()


def test_copy_has_change_error_one_and_truth_zero(effusion_case):
    prior, truth, _ = effusion_case
    region = V.changed_region(prior, truth)
    assert V.change_error(prior, prior, truth, region)[0] == pytest.approx(1.0)
    assert V.change_error(truth, prior, truth, region)[0] == 0.0
    half = prior + 0.5 * (truth - prior)
    assert V.change_error(half, prior, truth, region)[0] == pytest.approx(0.5, abs=1e-6)
    assert V.preservation_ssim(truth, truth, region)[0] == pytest.approx(1.0)
    # a stable pair has no changed region: the change error is undefined, not 0 or 1
    assert np.isnan(V.change_error(prior, prior, prior, V.changed_region(prior, prior))[0])


def test_the_wrong_side_loses_laterality_aware_effectiveness(effusion_case):
    prior, truth, masks = effusion_case
    judge = SideBlindJudge(masks)
    wrong = np.clip(prior + (truth - prior)[..., ::-1], 0, 1)  # the same change, mirrored onto the right lung
    target, changed = np.zeros((1, 5)), np.zeros((1, 5), bool)
    target[0, EFF], changed[0, EFF] = 1, True
    sides = np.full((1, 5), "", dtype=object)
    sides[0, EFF] = "left"
    p0 = judge.predict(prior)
    eff = {}
    for name, out in (("truth", truth), ("wrong", wrong)):
        sc = V.finding_scores(judge, out, prior)
        eff[name] = (V.shifts(sc, p0, target, changed)[0, EFF], V.shifts(sc, p0, target, changed, sides)[0, EFF])
    assert eff["truth"][0] > 0.1
    # the side-blind judge scores both alike; the hybrid sees only the requested side
    assert eff["wrong"][0] == pytest.approx(eff["truth"][0], rel=0.35)
    assert eff["truth"][1] == pytest.approx(eff["truth"][0])
    assert eff["wrong"][1] < 0.2 * eff["truth"][1]


def test_noise_loses_preservation_but_not_effectiveness(effusion_case):
    prior, truth, masks = effusion_case
    judge = SideBlindJudge(masks)
    noisy = np.clip(truth + np.random.default_rng(0).normal(0, 0.04, truth.shape), 0, 1)
    region = V.changed_region(prior, truth)
    assert V.preservation_ssim(noisy, truth, region)[0] < 0.8 * V.preservation_ssim(truth, truth, region)[0]
    target, changed = np.zeros((1, 5)), np.zeros((1, 5), bool)
    target[0, EFF], changed[0, EFF] = 1, True
    p0 = judge.predict(prior)
    e_truth = V.shifts(V.finding_scores(judge, truth, prior), p0, target, changed)[0, EFF]
    e_noisy = V.shifts(V.finding_scores(judge, noisy, prior), p0, target, changed)[0, EFF]
    assert e_noisy > 0.7 * e_truth


def test_physical_measures_recover_the_phantoms_grades():
    for index in (3, 8):
        ctrs, true = [], []
        fluid, density = [], []
        for g in (0, 1, 2, 3):
            _, masks, ctr = phantom(index, {"cardiomegaly": (g, "")})
            ctrs.append(V.cardiothoracic_ratio(masks[None])[0])
            true.append(ctr)
            x, masks, _ = phantom(index, {"effusion": (g, "left")})
            fluid.append(V.opaque_fraction(x[None], masks[None], "left")[0])
            x, masks, _ = phantom(index, {"edema": (g, "bilateral")})
            density.append(V.lung_density(x[None], masks[None])[0])
        assert np.allclose(ctrs, true, atol=0.02), (ctrs, true)
        assert V.dose_rho([0, 1, 2, 3], fluid) == 1.0 and V.dose_rho([0, 1, 2, 3], density) == 1.0


def test_dose_rho_known_answers():
    assert V.dose_rho([1, 2, 3], [0.1, 0.5, 0.9]) == 1.0
    assert V.dose_rho([1, 2, 3], [0.9, 0.5, 0.1]) == -1.0
    assert V.dose_rho([1, 2, 3], [0.4, 0.4, 0.4]) == 0.0  # no response to the dose
    assert V.dose_rho([1, 2, 3], [0.4, 0.4 + 3e-8, 0.4 - 2e-8]) == 0.0  # float noise is no response either
    assert np.isnan(V.dose_rho([1, 2, 3], [0.4, np.nan, 0.4]))


class _Reads:
    """A stub judge: `fn(images)` -> N x 5."""
    def __init__(self, fn):
        self.fn = fn

    def predict(self, images):
        return self.fn(np.asarray(images, float))


def _dose_plan() -> pd.DataFrame:
    """One prior's dose probes: each dose finding at grades 1-3 (effusion on the left)."""
    return pd.DataFrame([dict(probe_id=f"p__{V.FINDING_KEYS[f]}{g}", pair_id="p", kind="dose", finding=f,
                              grade=g, side="left" if f == "Pleural Effusion" else "", step=1, source="",
                              prompt="") for f in V.DOSE_FINDINGS for g in (1, 2, 3)])


def test_dose_response_reads_the_grade_with_the_severity_judge():
    # three dose probes per finding whose images get brighter with the requested grade; a finding judge that is
    # sure at every grade (presence, not grade) cannot order them, a judge that reads the grade can
    dose = _dose_plan()
    images = {r.probe_id: np.full((8, 8), 0.2 * r.grade) for r in dose.itertuples()}
    sure = _Reads(lambda x: np.full((len(x), len(FINDINGS)), 0.99))
    grade = _Reads(lambda x: np.repeat(x.mean(axis=(1, 2))[:, None] / 0.2, len(FINDINGS), axis=1))
    rho, _, per, _ = V._dose_response(dose, images, {"finding": sure, "severity": grade}, ["p"])
    assert rho == [1.0] and all(per[f] == [1.0] for f in V.DOSE_FINDINGS)
    rho, _, per, _ = V._dose_response(dose, images, {"finding": sure}, ["p"])  # no severity judge: the finding judge
    assert rho == [0.0] and all(per[f] == [0.0] for f in V.DOSE_FINDINGS)
    rho, _, _, _ = V._dose_response(dose, images, {"finding": sure, "severity": None}, ["p"])
    assert rho == [0.0]


def test_dose_response_per_finding_physical_measure():
    """The measure's rho per finding: a heart that widens with the grade while the lungs stay as they are orders
    cardiomegaly (cardiothoracic ratio) and nothing else (the lungs' opacity and density do not move)."""
    dose = _dose_plan()
    images = {}
    for r in dose.itertuples():  # a uniform image; the corner pixel, outside every organ, carries the grade
        images[r.probe_id] = np.full((16, 16), 0.5)
        images[r.probe_id][0, 0] = 0.1 * r.grade

    def masks(x):  # lungs: columns 1-6 and 9-14 of rows 2-13; heart: 2 x grade columns about the midline
        m = np.zeros((len(x), len(V.ORGANS), 16, 16), bool)
        for i, img in enumerate(np.asarray(x)):
            g = int(round(img[0, 0] / 0.1))
            m[i, V.ORGANS.index("left_lung"), 2:14, 1:7] = True
            m[i, V.ORGANS.index("right_lung"), 2:14, 9:15] = True
            m[i, V.ORGANS.index("heart"), 8:12, 8 - g:8 + g] = True
        return m
    sure = _Reads(lambda x: np.full((len(x), len(FINDINGS)), 0.99))
    _, phys, _, per = V._dose_response(dose, images, {"finding": sure, "anatomy": _Reads(masks)}, ["p"])
    assert per == {"Pleural Effusion": [0.0], "Cardiomegaly": [1.0], "Edema": [0.0]}
    assert phys == [pytest.approx(1 / 3)]  # the mean over the three findings


def test_untouched_organs_follow_the_changed_findings():
    changed = np.zeros(5, bool)
    sides = np.full(5, "", dtype=object)
    assert V.untouched_organs(changed, sides) == list(range(len(ORGANS)))
    changed[EFF], sides[EFF] = True, "left"
    kept = [ORGANS[i] for i in V.untouched_organs(changed, sides)]
    assert "left_lung" not in kept and "diaphragm" not in kept and {"right_lung", "heart", "spine"} <= set(kept)
    changed[FINDINGS.index("Cardiomegaly")] = True
    assert [ORGANS[i] for i in V.untouched_organs(changed, sides)] == ["spine"]


def test_probe_sentences_are_the_synthesisers():
    assert describe_change("Pleural Effusion", "new", 2, "left") == "New moderate left pleural effusion."
    assert describe_change("Pleural Effusion", "resolved", 2, "left") == "Resolved left pleural effusion."
    assert describe_change("Cardiomegaly", "new", 3) == "New severe cardiomegaly."
    assert null_description("IMPRESSION: Small left pleural effusion.") == "Unchanged small left pleural effusion."
    assert null_description("") == "No acute cardiopulmonary abnormality on either study."
    # a prior's own report compares it with an earlier study: its change words are not this pair's change
    assert null_description("IMPRESSION: New large right pneumothorax.") == "Unchanged large right pneumothorax."
    assert (null_description("FINDINGS: Worsening pulmonary edema, now severe. Decreased left basilar atelectasis, "
                             "now mild. Interval resolution of the right pneumothorax.")
            == "Unchanged mild left atelectasis and unchanged severe pulmonary edema.")
    with pytest.raises(ValueError, match="'Fracture'"):
        describe_change("Fracture", "new")


# --------------------------------------------------------------------------- a run folder

class BlobJudge:
    """Known-answer finding judge for the fake run: each finding's blob brightness above the background."""
    def predict(self, images):
        x = np.asarray(images, float)
        s = x.shape[-1] / 32
        return np.stack([x[:, int(r * s), int(c * s)] - x[:, int(2 * s), int(16 * s)] for r, c in BLOB.values()], 1)


JUDGES = {"finding": BlobJudge(), "anatomy": ThresholdSegmenter()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run, pipe = fake_model_run(tmp_path_factory.mktemp("validity"), 25,
                               models=("05_stage2/model", "05_stage2/one_stage/model", "04_stage1/model"))
    gen = run / "06_generate"
    pairs = C.test_pairs(run)
    C.generate_model("copy_prior", C.model_specs(run)["copy_prior"], pairs, gen, size=32)
    rng = np.random.default_rng(0)
    for pid, prior in zip(pairs["pair_id"], pairs["prior_path"]):
        # an oracle that returns the truth in its prior's intensity frame, and the truth with noise everywhere
        _, lo, hi = V.prior_frame(prior)
        t = np.clip((read_pixels(run / "00_phantom" / "truth" / "counterfactual" / f"{pid}.png") - lo) / (hi - lo), 0, 1)
        atomic_write_png(gen / "oracle" / f"{pid}.png", to_uint8(t))
        atomic_write_png(gen / "noisy" / f"{pid}.png", to_uint8(np.clip(t + rng.normal(0, 0.05, t.shape), 0, 1)))
    return run, pipe


def test_validity_table_known_answers(run, monkeypatch):
    run, pipe = run
    calls = []
    real = M.bootstrap_ci

    def recording(stat, n, n_boot=1000, seed=0, level=0.95):
        out = real(stat, n, n_boot, seed, level)
        calls.append(out)
        return out
    monkeypatch.setattr(V.M, "bootstrap_ci", recording)
    table, per_pair = V.evaluate_validity(run, run / "06_generate", JUDGES, ["oracle", "noisy", "copy_prior"],
                                          size=32, vae=pipe, n_boot=50)
    t = table.set_index("source")
    assert list(t.index) == ["oracle", "noisy", "copy_prior", "previous_label", "reference", "truth", "vae_truth"]
    assert t.loc["copy_prior", "effectiveness"] == 0.0 and t.loc["copy_prior", "change_error"] == pytest.approx(1.0)
    assert t.loc["oracle", "change_error"] == 0.0 and t.loc["oracle", "preservation_ssim"] == pytest.approx(1.0)
    assert t.loc["truth", "effectiveness"] > 0.2 and t.loc["truth", "effectiveness_rel"] == pytest.approx(1.0)
    assert t.loc["oracle", "effectiveness_rel"] == pytest.approx(1.0)
    assert t.loc["noisy", "preservation_ssim"] < t.loc["oracle", "preservation_ssim"] - 0.03
    assert t.loc["noisy", "effectiveness_rel"] > 0.8
    # copying the prior's labels is worth nothing on the findings that changed
    assert t.loc["previous_label", "changed_auroc"] == 0.0
    target, _ = V.label_changes(C.test_pairs(run))
    prior = np.stack([C.test_pairs(run)[f"prior_{f}"].to_numpy(float) for f in FINDINGS], 1)
    assert t.loc["previous_label", "pathology_auroc"] == M.pathology_auroc(prior, target, FINDINGS)["mean"]
    assert np.isnan(t.loc["previous_label", "effectiveness"])
    assert t.loc["vae_truth", "preservation_ssim"] < 1.0  # the random VAE loses the image
    # every published interval is what the bootstrap function returned, and brackets the estimate
    assert len(calls) == len(table)
    oracle = calls[0]
    assert (t.loc["oracle", "effectiveness_lo"], t.loc["oracle", "effectiveness_hi"]) == oracle["effectiveness"]
    for s in ("noisy", "truth"):
        assert t.loc[s, "effectiveness_lo"] <= t.loc[s, "effectiveness"] <= t.loc[s, "effectiveness_hi"]
    assert set(per_pair["source"]) == {"oracle", "noisy", "copy_prior", "reference", "truth", "vae_truth"}
    published = V.validity_table(table)
    assert published.set_index("source").loc["previous_label", "preservation_ssim"] == ""


def test_without_a_truth_the_truth_columns_are_empty(run, tmp_path):
    run, pipe = run
    bare = tmp_path / "run"
    shutil.copytree(run, bare)
    shutil.rmtree(bare / "00_phantom" / "truth" / "counterfactual")
    table, _ = V.evaluate_validity(bare, bare / "06_generate", JUDGES, ["oracle", "copy_prior"], size=32, vae=pipe,
                                   n_boot=0)
    t = table.set_index("source")
    assert "truth" not in t.index and "vae_truth" not in t.index
    for c in V.TRUTH_COLUMNS:
        assert t[c].isna().all(), c
    assert t.loc["oracle", "effectiveness"] > 0.2 and t.loc["copy_prior", "effectiveness"] == 0.0
    assert t.loc["copy_prior", "anatomy_dice"] == 1.0 and t["anatomy_dice"].drop("previous_label").notna().all()
    # the guidance rule falls back to the anatomy of untouched organs, against the real follow-up's
    (bare / "05_stage2" / "guidance").mkdir(parents=True, exist_ok=True)
    table, choice = V.select_guidance(bare, bare / "05_stage2" / "guidance", JUDGES, size=32, settings={"steps": 2},
                                      grid=[(1.5, 1.5), (7.5, 1.5)], models=("biomedjourney",))
    assert choice["preservation_metric"] == "anatomy_dice" and choice["ceiling_source"] == "reference"
    assert set(table["model"]) == {"biomedjourney", "copy_prior", "reference"}


def test_probes_chain_and_score(run, tmp_path):
    run, pipe = run
    pairs = C.test_pairs(run)
    plan = V.generate_probes(run, tmp_path, ["copy_prior", "biomedjourney"], size=32, n_priors=2,
                             settings={"steps": 2})
    first = pairs["pair_id"][0]
    null = plan[(plan["pair_id"] == first) & (plan["kind"] == "null")].sort_values("step")
    assert list(null["step"]) == list(range(1, 11)) and null["source"].iloc[1] == f"{first}__null1"
    assert null["prompt"].nunique() == 1
    prior = pairs.iloc[0]
    for f in V.DOSE_FINDINGS:  # dose probes exactly for the dose findings the prior does not have
        has = plan[(plan["pair_id"] == first) & (plan["finding"] == f) & (plan["kind"] == "dose")]
        assert len(has) == (0 if prior[f"prior_{f}"] == 1 else 3)
    made = {p.stem for p in (tmp_path / "biomedjourney").glob("*.png")}
    assert made == set(plan["probe_id"])
    # step 2 of the null chain starts from step 1's output (step k's seeds are seed + 1000 k + row)
    gen = C.load_generator("biomedjourney", C.model_specs(run)["biomedjourney"])
    again = gen(read_image(tmp_path / "biomedjourney" / f"{first}__null1.png")[None], [null["prompt"].iloc[0]], 2000,
                steps=2)
    assert np.abs(again[0] - read_image(tmp_path / "biomedjourney" / f"{first}__null2.png")).max() <= 1 / 255 + 1e-6
    summary, per_prior = V.score_probes(run, tmp_path, JUDGES, ["copy_prior", "biomedjourney"], size=32, n_boot=20)
    s = summary.set_index("source")
    assert s.loc["copy_prior", "null_edit_ssim"] == pytest.approx(1.0)
    assert s.loc["copy_prior", "null_edit_ssim_10"] == pytest.approx(1.0)
    assert s.loc["copy_prior", "dose_response_rho"] == 0.0  # the same image at every dose
    # per finding, over the priors without it; their mean per prior is the overall rho
    cols = [f"dose_response_rho_{k}" for k in ("effusion", "cardiomegaly", "edema")]
    assert all(s.loc["copy_prior", c] == 0.0 or np.isnan(s.loc["copy_prior", c]) for c in cols)
    bj = per_prior[per_prior["source"] == "biomedjourney"]
    np.testing.assert_allclose(bj[cols].mean(axis=1, skipna=True), bj["dose_response_rho"], atol=1e-9)
    for c, f in zip(cols, V.DOSE_FINDINGS):
        had = pairs.head(2)[f"prior_{f}"].to_numpy() == 1
        assert np.isnan(bj[c].to_numpy()[had]).all() and not np.isnan(bj[c].to_numpy()[~had]).any()
    assert s.loc["biomedjourney", "null_edit_ssim"] < 1.0
    assert len(per_prior) == 4 and s.loc["copy_prior", "null_edit_ssim_lo"] <= 1.0
    # a rerun makes nothing again
    mt = {p: p.stat().st_mtime_ns for p in (tmp_path / "biomedjourney").glob("*.png")}
    V.generate_probes(run, tmp_path, ["biomedjourney"], size=32, n_priors=2, settings={"steps": 2})
    assert all(p.stat().st_mtime_ns == t for p, t in mt.items())


def test_floor_margin_asks_for_confidence_not_a_lucky_draw():
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(150)]
    ceiling = pd.Series(0.95, index=ids)
    floor = V.PRESERVATION_FLOOR * 0.95
    # every pair clears the floor by 0.01: the margin is 0.01 and certain
    margin, lo = V.floor_margin(pd.Series(floor + 0.01, index=ids), ceiling)
    assert margin == pytest.approx(0.01) and lo == pytest.approx(0.01)
    # clearing it by 0.002 on average with a spread of 0.06 per pair is not enough: the lower end is under 0
    noisy = floor + 0.002 + rng.normal(0, 0.06, len(ids))
    noisy += floor + 0.002 - noisy.mean()
    margin, lo = V.floor_margin(pd.Series(noisy, index=ids), ceiling)
    assert margin == pytest.approx(0.002) and lo < -0.005
    # by 0.03 with the same spread it is
    margin, lo = V.floor_margin(pd.Series(noisy + 0.028, index=ids), ceiling)
    assert lo > 0.01
    # pairs are matched by id; a pair the ceiling lacks is left out, not misaligned
    kept = pd.Series([floor + 0.01] * 149 + [0.0], index=ids)
    assert V.floor_margin(kept, ceiling.iloc[:149])[0] == pytest.approx(0.01)
    assert all(np.isnan(V.floor_margin(kept, pd.Series(dtype=float))))


def _setting(eff_per_pair, n_changed):
    return pd.DataFrame({"effectiveness": eff_per_pair, "n_changed": n_changed},
                        index=[f"p{i}" for i in range(len(eff_per_pair))])


def test_effectiveness_gap_is_the_tables_mean_over_changed_findings():
    """The gap is the difference of the table's effectiveness (the mean over changed findings, so a pair with
    three changed findings weighs three times), its error the spread of that difference over resampled pairs."""
    best = _setting([0.6, 0.3, np.nan, 0.9], [1, 3, 0, 2])
    other = _setting([0.5, 0.3, 0.2, 0.6], [1, 3, 0, 2])
    gap, se = V.effectiveness_gap(best, other)
    assert gap == pytest.approx((0.1 * 1 + 0 * 3 + 0.3 * 2) / 6)
    assert 0 < se < gap
    assert V.effectiveness_gap(best, best) == (0.0, 0.0)
    assert all(np.isnan(V.effectiveness_gap(_setting([np.nan], [0]), _setting([0.1], [0]))))


def test_one_standard_error_rule_takes_the_weakest_guidance_that_is_not_surely_worse():
    """Stronger guidance than the effect needs overshoots (every grade drawn as the largest): among the kept
    settings, a weaker text scale whose effectiveness trails the best by less than its standard error is taken;
    one that surely trails it is not."""
    rng = np.random.default_rng(0)
    n = np.full(150, 2)
    base = rng.uniform(0.2, 0.9, 150)
    noise = rng.normal(0, 0.2, 150)
    noise -= noise.mean()
    per_pair = {0: _setting(base + 0.01, n),                                    # text 10: the most effective
                1: _setting(base + noise, n),                                   # text 7.5: 0.01 less, noisy
                2: _setting(base - 0.1 + rng.normal(0, 0.02, 150), n)}          # text 5: surely less
    kept = pd.DataFrame({"text_scale": [10.0, 7.5, 5.0], "image_scale": 1.5,
                         "effectiveness": [float(per_pair[i]["effectiveness"].mean()) for i in range(3)]})
    out = V.weakest_near_best(kept, per_pair)
    assert out["gap"][0] == 0 and out["gap"][2] > V.EFFECT_SE * out["se"][2]
    assert out["gap"][1] <= V.EFFECT_SE * out["se"][1]
    assert list(out["chosen"]) == [False, True, False]
    # the weaker setting made as steady as the best: now its 0.01 shortfall is sure, the strongest is taken
    per_pair[1] = _setting(base, n)
    kept.loc[1, "effectiveness"] = float(base.mean())
    assert list(V.weakest_near_best(kept, per_pair)["chosen"]) == [True, False, False]


def test_guidance_rule_does_not_reward_copying(run):
    run, pipe = run
    out = run / "05_stage2" / "guidance"
    grid = [(1.5, 1.5), (7.5, 1.5), (2.0, 4.0)]
    table, choice = V.select_guidance(run, out, JUDGES, size=32, settings={"steps": 2}, grid=grid, vae=pipe)
    val = C.test_pairs(run, split="val")
    assert choice["n_val_pairs"] == len(val) > 0
    assert set(table["model"]) == {"biomedjourney", "one_stage", "copy_prior", "reference", "truth", "vae_truth"}
    bmj = table[table["model"] == "biomedjourney"]
    kept = bmj[bmj["floor_margin_lo"] >= 0]
    # the margin is the mean of preservation - floor x the ceiling's, pair by pair
    floor = V.PRESERVATION_FLOOR * table.set_index("model").loc["vae_truth", "preservation"]
    np.testing.assert_allclose(bmj["floor_margin"], bmj["preservation"] - floor, atol=1e-9)
    assert (bmj["floor_margin_lo"] <= bmj["floor_margin"] + 1e-12).all()
    if len(kept):  # the weakest text scale within one standard error of the most effective kept setting
        near = kept[kept["effectiveness_gap"] <= V.EFFECT_SE * kept["effectiveness_gap_se"] + 1e-12]
        assert kept.loc[kept["effectiveness"].idxmax(), "effectiveness_gap"] == 0
        best = near[near["text_scale"] == near["text_scale"].min()].sort_values("effectiveness").iloc[-1]
    else:
        best = bmj.loc[bmj["preservation"].idxmax()]
    assert (choice["text_scale"], choice["image_scale"]) == (best["text_scale"], best["image_scale"])
    assert table["chosen"].sum() == 1 and choice["met_floor"] == bool(len(kept))
    # copying scores zero effectiveness: the rule can never prefer it to a setting that edits
    assert table.set_index("model").loc["copy_prior", "effectiveness"] == 0.0
    # only validation pairs were generated, never a test pair
    made = {p.stem for p in (out / "text7.5_image1.5" / "biomedjourney").glob("*.png")}
    assert made == set(val["pair_id"]) and not made & set(C.test_pairs(run)["pair_id"])
    # the curve's numbers are the validity metrics of those files
    row = bmj[(bmj["text_scale"] == 7.5) & (bmj["image_scale"] == 1.5)].iloc[0]
    t, _ = V.evaluate_validity(run, out / "text7.5_image1.5", JUDGES, ["biomedjourney"], size=32, n_boot=0,
                               pairs=val)
    assert t.set_index("source").loc["biomedjourney", "effectiveness"] == pytest.approx(row["effectiveness"])
    assert C.resolve_guidance(run, "auto", "auto") == (choice["text_scale"], choice["image_scale"])
    fig = V.plot_edit_preservation(table, choice, run / "figs")
    assert (run / "figs" / "fig_edit_preservation.png").is_file() and fig is not None


def test_images_of_different_sizes_are_compared_at_the_evaluation_size(tmp_path):
    """A real cohort's priors and follow-ups need not share a size (an ICG-CXR folder read as registered, or
    unregistered follow-ups): step 07's loaders resize each image on its own."""
    import pandas as pd

    from bmjlib.evaluation.evaluate import load_sources

    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(300, 260), (512, 512), (200, 240)]):
        for kind, (hh, ww) in (("prior", (h, w)), ("follow", (w, h))):
            atomic_write_png(tmp_path / f"{kind}{i}.png", to_uint8(rng.random((hh, ww))))
        atomic_write_png(tmp_path / "gen" / "m" / f"p{i}.png", to_uint8(rng.random((64, 64))))
        rows.append({"pair_id": f"p{i}", "prior_path": str(tmp_path / f"prior{i}.png"),
                     "registered_path": str(tmp_path / f"follow{i}.png")})
    pairs = pd.DataFrame(rows)
    frames = V.load_frames(tmp_path / "run", tmp_path / "gen", pairs, ["m"], 32)
    sources = load_sources(tmp_path / "run", tmp_path / "gen", pairs, ["m"], 32)
    for images in (frames, sources):
        assert all(images[k].shape == (3, 32, 32) for k in ("prior", "reference", "m")) and "truth" not in images
    want = resize_image(read_image(tmp_path / "follow1.png"), 32)
    assert np.allclose(sources["reference"][1], want)
