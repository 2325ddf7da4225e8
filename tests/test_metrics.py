"""Known-answer tests of the evaluation metrics (bmjlib.evaluation.metrics)."""
import math

import numpy as np
import pandas as pd
import pytest

from bmjlib.evaluation import evaluate as E
from bmjlib.evaluation import metrics as M
from bmjlib.io import atomic_write_png, read_image
from bmjlib.schema import FINDINGS, ORGANS

NAMES = ["a", "b"]


def test_cmig_known_values():
    # sqrt(0.8 * sqrt(0.9 * 0.4)) = sqrt(0.8 * 0.6)
    assert M.cmig([0.8], [0.9, 0.4]) == pytest.approx(math.sqrt(0.48))
    # general over lists: two accuracies, three retentions
    a, f = [0.5, 0.8], [1.0, 0.25, 0.5]
    expect = math.sqrt(math.sqrt(0.4) * (0.125 ** (1 / 3)))
    assert M.cmig(a, f) == pytest.approx(expect)
    # scale-equivariant: percentages give 100x
    assert M.cmig([80.0], [90.0, 40.0]) == pytest.approx(100 * math.sqrt(0.48))


def test_cmig_negative_correlation_is_clipped_to_zero():
    assert M.cmig([0.9], [0.95, -0.2]) == 0.0


def test_geomean_rejects_nan_and_negative():
    with pytest.raises(ValueError, match="NaN"):
        M.geomean([0.5, float("nan")])
    with pytest.raises(ValueError, match="negative"):
        M.geomean([0.5, -1])
    with pytest.raises(ValueError, match="empty"):
        M.geomean([])


def test_auroc_perfect_inverted_and_undefined():
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert M.auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert math.isnan(M.auroc(np.ones(4), np.arange(4.0)))
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    yy, ss = rng.integers(0, 2, 300), rng.integers(0, 10, 300) / 10  # many ties
    assert M.auroc(yy, ss) == pytest.approx(roc_auc_score(yy, ss))


def test_binarize_labels_chexpert_policy():
    out = M.binarize_labels(np.array([1, 0, -1, np.nan]))
    assert out[0] == 1 and out[1] == 0 and np.isnan(out[2]) and out[3] == 0


def test_pathology_auroc_per_finding_and_mean():
    labels = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], float)
    scores = np.array([[0.1, 0.2], [0.9, 0.8], [0.2, 0.9], [0.8, 0.3]])
    out = M.pathology_auroc(scores, labels, NAMES)
    assert out["a"] == 1.0 and out["b"] == 0.5 and out["mean"] == 0.75
    with pytest.raises(ValueError, match="disagree"):
        M.pathology_auroc(scores[:, :1], labels, NAMES)


def test_changed_auroc_copy_prior_cannot_score():
    rng = np.random.default_rng(0)
    prior = rng.integers(0, 2, (200, 2)).astype(float)
    follow = prior.copy()
    flip = rng.random((200, 2)) < 0.3
    follow[flip] = 1 - follow[flip]
    perfect_on_copy = prior * 0.8 + 0.1      # a perfect judge looking at the copied prior
    perfect_on_truth = follow * 0.8 + 0.1    # a perfect judge looking at a perfect counterfactual
    # the paper's metric rewards copying for stable findings ...
    assert M.pathology_auroc(perfect_on_copy, follow, NAMES)["mean"] > 0.6
    # ... the changed-only metric does not
    assert M.changed_auroc(perfect_on_copy, follow, prior, NAMES)["mean"] == 0.0
    assert M.changed_auroc(perfect_on_truth, follow, prior, NAMES)["mean"] == 1.0


def test_retention_auroc_binary_and_multiclass():
    assert M.retention_auroc(np.array([0.2, 0.7]), np.array([0, 1])) == 1.0
    probs = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.9 + 0.03
    assert M.retention_auroc(probs, np.array([0, 1, 2, 0, 1, 2])) == 1.0
    assert M.retention_auroc(probs, np.array([1, 2, 0, 1, 2, 0])) < 0.5
    # a patient of another race (NaN) is left out, not counted as a negative of every class
    probs7 = np.vstack([probs, [[0.9, 0.05, 0.05]]])
    assert M.retention_auroc(probs7, np.array([0, 1, 2, 0, 1, 2, np.nan])) == 1.0


def test_pearson_r_known():
    x = np.arange(10.0)
    assert M.pearson_r(2 * x + 3, x) == pytest.approx(1.0)
    assert M.pearson_r(-x, x) == pytest.approx(-1.0)
    assert math.isnan(M.pearson_r(np.ones(10), x))


def test_spearman_rho_known():
    x = np.arange(10.0)
    assert M.spearman_rho(np.exp(x), x) == pytest.approx(1.0)  # any increasing reading of the grade
    assert M.spearman_rho([0, 1, 1, 2], [0, 1, 2, 3]) == pytest.approx(0.9486833)  # ties get their average rank
    assert M.spearman_rho([1.0, np.nan, 3.0, 2.0], [1, 2, 3, 4]) == pytest.approx(0.5)  # NaN pairs left out
    assert math.isnan(M.spearman_rho(np.ones(10), x))


def test_kl_identical_is_zero_and_known_value():
    p = np.array([[0.2, 0.5, 0.1], [0.9, 0.05, 0.3]])
    assert np.allclose(M.kl_divergence(p, p), 0.0)
    assert np.allclose(M.bernoulli_kl(p, p), 0.0, atol=1e-12)
    kl = M.kl_divergence(np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]]))[0]
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert (M.kl_divergence(p, p[::-1]) > 0).all()


def test_dice_identical_disjoint_half():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True
    a[1, 0, :4] = True
    assert np.allclose(M.dice(a, a), 1.0)
    b = np.zeros_like(a)
    b[0, 2:, 2:] = True
    b[1, 0, 2:] = True
    b[1, 1, :2] = True
    assert M.dice(a, b)[0] == 0.0 and M.dice(a, b)[1] == 0.5
    assert np.isnan(M.dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))  # nothing found: undefined
    assert M.mean_dice(a[None], b[None])[0] == 0.25


def test_fidelity_metrics_known_answers():
    rng = np.random.default_rng(1)
    true = rng.random((2, 64, 64)) * 0.8
    assert M.psnr(true + 0.1, true) == pytest.approx([20.0, 20.0])
    assert np.allclose(M.ssim(true, true), 1.0)
    assert np.allclose(M.ms_ssim(true, true), 1.0, atol=1e-5)
    noisy = np.clip(true + rng.normal(0, 0.2, true.shape), 0, 1)
    assert (M.ms_ssim(noisy, true) < 0.95).all() and (M.ssim(noisy, true) < 0.9).all()
    assert np.isnan(M.ms_ssim(true[:, :32, :32], true[:, :32, :32])).all()  # too small: undefined
    big = rng.random((1, 192, 192))
    assert M.ms_ssim(big, big)[0] == pytest.approx(1.0, abs=1e-5)


def test_bootstrap_interval_covers_and_is_degenerate_for_constant():
    x = np.random.default_rng(2).normal(5, 1, 400)
    lo, hi = M.bootstrap_ci(lambda i: x[i].mean(), len(x), 300, seed=0)
    assert lo < x.mean() < hi and hi - lo < 0.4
    c = np.full(50, 3.0)
    assert M.bootstrap_ci(lambda i: c[i].mean(), 50, 20) == (3.0, 3.0)
    assert all(math.isnan(v) for v in M.bootstrap_ci(lambda i: 1.0, 10, 0))


def test_bootstrap_se_of_a_mean_is_its_standard_error():
    """The bootstrap standard error of a mean is the sample's spread over the square root of its size."""
    x = np.random.default_rng(1).normal(0.0, 2.0, 400)
    assert M.bootstrap_se(lambda i: x[i].mean(), len(x), 2000, seed=0) == pytest.approx(
        x.std() / math.sqrt(len(x)), rel=0.1)
    assert M.bootstrap_se(lambda i: 3.0, 50, 20) == 0.0
    assert math.isnan(M.bootstrap_se(lambda i: 1.0, 10, 0)) and math.isnan(M.bootstrap_se(lambda i: 1.0, 0))


def test_a_paired_difference_cancels_the_difficulty_two_generators_share():
    """Two scores that differ by a constant on every pair: side by side their intervals overlap (the pairs' spread
    dominates), on the same resamples the difference is that constant exactly."""
    x = np.random.default_rng(3).normal(0.0, 1.0, 60)
    better = M.bootstrap_draws(lambda i: x[i].mean() + 0.1, len(x), 500, seed=4)
    worse = M.bootstrap_draws(lambda i: x[i].mean(), len(x), 500, seed=4)
    lo_b, _ = M.draws_interval(better)
    _, hi_w = M.draws_interval(worse)
    assert lo_b < hi_w  # the two intervals overlap
    lo, hi = M.paired_difference_ci(better, worse)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # dict draws: one number by name; a NaN draw (e.g. one class only in a resample) is dropped
    a = [{"cmig": 0.9}, {"cmig": float("nan")}, {"cmig": 0.7}]
    b = [{"cmig": 0.5}, {"cmig": 0.5}, {"cmig": 0.5}]
    assert M.paired_difference_ci(a, b, "cmig", level=0.0) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="3 draws against 2"):
        M.paired_difference_ci(a, b[:2], "cmig")
    # the published interval is the percentile interval of the same draws
    assert M.bootstrap_ci(lambda i: x[i].mean(), len(x), 500, seed=4) == M.draws_interval(worse)


def _scored_pairs(tmp_path, n=12, models=("m",)):
    """n pairs with random images, a generated image per pair for each of `models`, and judges that read the
    image's brightness in five horizontal bands (findings), the first (sex), the second (age)."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        pid = f"p{k:02d}"
        for kind in ("prior", "followup"):
            atomic_write_png(tmp_path / f"{pid}_{kind}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
        for m in models:
            atomic_write_png(tmp_path / "gen" / m / f"{pid}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
        rows.append({"pair_id": pid, "prior_path": str(tmp_path / f"{pid}_prior.png"),
                     "followup_path": str(tmp_path / f"{pid}_followup.png"), "sex": "MF"[k % 2], "age": 40.0 + 3 * k,
                     **{f"followup_{f}": float((k + j) % 3 == 0) for j, f in enumerate(FINDINGS)},
                     **{f"prior_{f}": float((k + j) % 2 == 0) for j, f in enumerate(FINDINGS)}})
    pairs = pd.DataFrame(rows)

    class Judge:  # deterministic scores from the image: brightness of five horizontal bands
        def __init__(self, kind):
            self.kind = kind

        def predict(self, x):
            bands = np.stack([b.mean(axis=(1, 2)) for b in np.array_split(x, len(FINDINGS), axis=1)], 1)
            if self.kind == "finding":
                return bands
            if self.kind == "anatomy":
                return np.stack([x > 0.3 + 0.05 * i for i in range(len(ORGANS))], 1)
            return bands[:, 0] if self.kind == "sex" else 100 * bands[:, 1]

    return pairs, {k: Judge(k) for k in ("finding", "sex", "age", "anatomy")}


def test_published_intervals_are_bootstrap_ci(tmp_path):
    """evaluate.evaluate's summary intervals are bootstrap_ci's, resample for resample."""
    n = 12
    pairs, judges = _scored_pairs(tmp_path, n)
    summary, _ = E.evaluate(tmp_path, tmp_path / "gen", judges, ["m"], size=8, n_boot=40, seed=5, pairs=pairs)
    row = summary.set_index("source").loc["m"]

    scores = judges["finding"].predict(E.load_sources(tmp_path, tmp_path / "gen", pairs, ["m"], 8)["m"])
    truth = E.truth_of(pairs)["followup"]
    lo, hi = M.bootstrap_ci(lambda i: M.pathology_auroc(scores[i], truth[i], FINDINGS)["mean"], n, 40, seed=5)
    assert not math.isnan(lo) and (row["pathology_auroc_lo"], row["pathology_auroc_hi"]) == (lo, hi)
    lo, hi = M.bootstrap_ci(lambda i: M.pearson_r(100 * scores[i, 1], pairs["age"].to_numpy(float)[i]), n, 40,
                            seed=5)
    assert (row["age_r_lo"], row["age_r_hi"]) == (lo, hi)


def test_cmig_differences_are_paired_on_the_same_resamples(tmp_path):
    """Each model's CMIG minus copying's (and minus one-stage's) is the difference of the two CMIGs, with the
    interval of that difference over the resamples both were scored on; a generator that returns the prior
    scores 0 [0, 0] against copying."""
    pairs, judges = _scored_pairs(tmp_path, 12, models=("m", "one_stage"))
    for _, r in pairs.iterrows():  # copy_prior, and a second generator that returns the prior too
        prior = (np.asarray(read_image(r["prior_path"])) * 255).round().astype(np.uint8)
        for m in ("copy_prior", "prior_again"):
            atomic_write_png(tmp_path / "gen" / m / f"{r['pair_id']}.png", prior)
    models = ["m", "one_stage", "copy_prior", "prior_again"]
    summary, _ = E.evaluate(tmp_path, tmp_path / "gen", judges, models, size=8, n_boot=60, seed=2, pairs=pairs)
    s = summary.set_index("source")
    assert (s.at["prior_again", "cmig_minus_copy_prior"], s.at["prior_again", "cmig_minus_copy_prior_lo"],
            s.at["prior_again", "cmig_minus_copy_prior_hi"]) == (0.0, 0.0, 0.0)
    assert s.at["m", "cmig_minus_copy_prior"] == pytest.approx(s.at["m", "cmig"] - s.at["copy_prior", "cmig"])
    assert s.at["m", "cmig_minus_one_stage"] == pytest.approx(s.at["m", "cmig"] - s.at["one_stage", "cmig"])
    assert np.isnan(s.at["copy_prior", "cmig_minus_copy_prior"])  # not against itself

    imgs = E.load_sources(tmp_path, tmp_path / "gen", pairs, models, 8)
    t = E.truth_of(pairs)

    def cmig_of(src):
        o = E.judge_outputs(judges, imgs[src])
        return lambda i: E._cmig(M.pathology_auroc(o["finding"][i], t["followup"][i], FINDINGS)["mean"],
                                 M.retention_auroc(o["retention"][i], t["retention"][i]),
                                 M.pearson_r(o["age"][i], t["age"][i]))
    by_hand = M.paired_difference_ci(M.bootstrap_draws(cmig_of("m"), 12, 60, seed=2),
                                     M.bootstrap_draws(cmig_of("copy_prior"), 12, 60, seed=2))
    assert (s.at["m", "cmig_minus_copy_prior_lo"], s.at["m", "cmig_minus_copy_prior_hi"]) == pytest.approx(by_hand)
    assert not np.isnan(by_hand[0])

