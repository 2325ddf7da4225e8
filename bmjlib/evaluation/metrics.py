"""Counterfactual evaluation metrics (paper §4.3, §5.2, §5.4.1-5.4.2, App. A.2; DESIGN "Evaluation").

- CMIG score = sqrt(geomean(accuracy metrics) x geomean(retention metrics)), general over lists.
- Pathology AUROC of a judge's scores on the counterfactuals against the follow-up's labels, per finding
  and mean (Tables 1, 3), and the same AUROC restricted, per finding, to the pairs whose label CHANGED
  between prior and follow-up. The paper's metric rewards an unchanged image for every stable finding
  (copying the prior scores well); on changed findings copying the prior is systematically wrong.
- Retention: AUROC of a demographic judge (race one-vs-rest at paper scale, sex at demo scale) against
  the true attribute, and the Pearson r of predicted against true age.
- KL divergence between the judge's outputs on the reference and on the counterfactual (Table 3,
  App. A.2: sum_i p(i) log p(i)/q(i), p = C(I_real), q = C(I_synth)).
- Anatomy Dice between two segmentations (Table 4).
- Pixel fidelity against the phantom's true counterfactual: SSIM, MS-SSIM, PSNR (no real dataset has it).
- Bootstrap 95 % intervals over pairs.

All functions take plain numpy arrays; scores are fractions in [0, 1] (tables multiply by 100).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from scipy.stats import rankdata, spearmanr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# --------------------------------------------------------------------------- CMIG

def geomean(values: Sequence[float]) -> float:
    """Geometric mean of non-negative values (0 if any is 0). NaN in -> ValueError naming it."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("geomean of an empty list")
    if np.isnan(v).any():
        raise ValueError(f"geomean: NaN among {v.tolist()}")
    if (v < 0).any():
        raise ValueError(f"geomean: negative value among {v.tolist()} (clip before, see cmig)")
    if (v == 0).any():
        return 0.0
    return float(np.exp(np.log(v).mean()))


def cmig(accuracy: Sequence[float], retention: Sequence[float]) -> float:
    """CMIG score (§4.3): sqrt(geomean(accuracy) * geomean(retention)).

    A negative metric (e.g. an age correlation below zero) is clipped to 0 first: a generator whose
    ages anti-correlate retains nothing, and the geometric mean of a negative number is undefined.
    """
    a = [max(float(x), 0.0) for x in accuracy]
    f = [max(float(x), 0.0) for x in retention]
    return float(np.sqrt(geomean(a) * geomean(f)))


# --------------------------------------------------------------------------- AUROC

def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC; NaN when the labels hold one class only (undefined, never a fake 0.5)."""
    y = np.asarray(labels, dtype=float)
    s = np.asarray(scores, dtype=float)
    keep = ~np.isnan(y) & ~np.isnan(s)
    y, s = y[keep], s[keep]
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    # Mann-Whitney U from mid-ranks (ties count one half): equals sklearn's roc_auc_score, ~20x faster,
    # which matters inside the bootstrap.
    r = rankdata(s)
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def binarize_labels(labels: np.ndarray) -> np.ndarray:
    """CheXpert labels (1, 0, -1, NaN) -> 1 / 0 / NaN: blank counts as negative (not mentioned),
    uncertain (-1) is left out (NaN) as in the U-Ignore policy."""
    y = np.asarray(labels, dtype=float).copy()
    y[np.isnan(y)] = 0.0
    y[y == -1] = np.nan
    return y


def pathology_auroc(scores: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Per-finding AUROC of judge scores (N x K) against binary labels (N x K, NaN = excluded), plus
    'mean' over the findings where it is defined."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, float)
    if scores.shape != labels.shape or scores.shape[1] != len(names):
        raise ValueError(f"scores {scores.shape} / labels {labels.shape} / {len(names)} names disagree")
    out = {n: auroc(labels[:, k], scores[:, k]) for k, n in enumerate(names)}
    vals = [v for v in out.values() if not np.isnan(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def changed_auroc(scores: np.ndarray, followup: np.ndarray, prior: np.ndarray,
                  names: Sequence[str]) -> dict[str, float]:
    """Pathology AUROC over only the pairs whose label changed between prior and follow-up, per finding.

    On those pairs the follow-up label is the opposite of the prior's, so a model that copies the prior
    scores below 0.5 here (a perfect judge on a copied prior gives 0).
    """
    followup, prior = np.asarray(followup, float), np.asarray(prior, float)
    masked = followup.copy()
    masked[~(followup != prior) | np.isnan(prior)] = np.nan
    return pathology_auroc(scores, masked, names)


def retention_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of a demographic judge: binary (N scores, labels 0/1) or multi-class one-vs-rest macro
    (N x C probabilities, integer labels), e.g. race Asian / Black / White at paper scale."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels)
    if scores.ndim == 1:
        return auroc(labels, scores)
    keep = ~pd_isna(labels)  # e.g. races outside the model's classes are left out, not counted negative
    scores, labels = scores[keep], labels[keep].astype(float)
    per = [auroc((labels == c).astype(float), scores[:, c]) for c in range(scores.shape[1])]
    per = [p for p in per if not np.isnan(p)]
    return float(np.mean(per)) if per else float("nan")


def pd_isna(a: np.ndarray) -> np.ndarray:
    return np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in np.asarray(a, dtype=object)])


def pearson_r(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation (age retention); NaN when either side is constant."""
    p, t = np.asarray(pred, float), np.asarray(true, float)
    keep = ~np.isnan(p) & ~np.isnan(t)
    p, t = p[keep], t[keep]
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def spearman_rho(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation (a judge's grade against the truth's) over the pairs where neither is NaN; NaN
    when either side is constant."""
    p, t = np.asarray(pred, float), np.asarray(true, float)
    keep = ~np.isnan(p) & ~np.isnan(t)
    p, t = p[keep], t[keep]
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(spearmanr(p, t).statistic)


# --------------------------------------------------------------------------- KL divergence (App. A.2)

def kl_divergence(p_scores: np.ndarray, q_scores: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-pair KL(p || q) = sum_i p(i) log(p(i)/q(i)) between the judge's outputs on the real reference
    (p) and on the counterfactual (q), both N x K.

    The judge gives K independent finding probabilities, not a distribution; following the appendix's
    formula over categories i, each row is normalised to sum to one first (clipped at `eps`).
    Returns N values (nats); 0 for identical rows.
    """
    p = np.clip(np.asarray(p_scores, float), eps, None)
    q = np.clip(np.asarray(q_scores, float), eps, None)
    if p.shape != q.shape:
        raise ValueError(f"KL: shapes differ {p.shape} vs {q.shape}")
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    return (p * np.log(p / q)).sum(axis=1)


def bernoulli_kl(p_scores: np.ndarray, q_scores: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-pair sum over findings of KL(Bern(p) || Bern(q)): a variant that keeps each finding's own
    presence probability instead of normalising across findings."""
    p = np.clip(np.asarray(p_scores, float), eps, 1 - eps)
    q = np.clip(np.asarray(q_scores, float), eps, 1 - eps)
    return (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(axis=1)


# --------------------------------------------------------------------------- Dice (Table 4)

def dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice per mask over the last two axes of two boolean arrays (..., H, W). NaN where both masks are
    empty: an organ neither segmentation finds says nothing about agreement (and a judge that finds
    nothing anywhere must not score a perfect 1)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: mask shapes differ {a.shape} vs {b.shape}")
    inter = (a & b).sum(axis=(-2, -1)).astype(float)
    total = a.sum(axis=(-2, -1)).astype(float) + b.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, np.nan, 2 * inter / np.maximum(total, 1))


def mean_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Dice averaged over the organs where it is defined, for N x organs x H x W -> N values."""
    d = dice(a, b)
    with np.errstate(invalid="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(d, axis=-1)


# --------------------------------------------------------------------------- pixel fidelity (phantom)

def psnr(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB, data range 1) for N x H x W arrays in [0, 1]."""
    return np.array([peak_signal_noise_ratio(t, p, data_range=1.0)
                     for p, t in zip(np.asarray(pred, float), np.asarray(true, float))])


def ssim(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image SSIM (skimage, Gaussian 7x7-equivalent default window, data range 1)."""
    return np.array([structural_similarity(t, p, data_range=1.0)
                     for p, t in zip(np.asarray(pred, float), np.asarray(true, float))])


def ms_ssim(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image MS-SSIM (pytorch_msssim, the standard five scales and weights). The library needs the
    smaller side > (window - 1) * 16; the Gaussian window shrinks from the standard 11 px to the largest
    odd size that fits (3 px at 64 px); below 48 px MS-SSIM is undefined and NaN is returned."""
    p = torch.as_tensor(np.asarray(pred, np.float32))[:, None]
    t = torch.as_tensor(np.asarray(true, np.float32))[:, None]
    side = min(p.shape[-2:])
    wins = [w for w in (11, 9, 7, 5, 3) if side > (w - 1) * 16]
    if not wins:
        return np.full(p.shape[0], np.nan)
    return _ms_ssim(p, t, data_range=1.0, size_average=False, win_size=wins[0]).numpy().astype(float)


# --------------------------------------------------------------------------- bootstrap

def bootstrap_ci(stat: Callable[[np.ndarray], float | dict], n: int, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of `stat(indices)` over `n` pairs resampled with replacement.

    `stat` receives an index array and returns a number, or a dict of named numbers (several statistics
    on the same resamples, as evaluate.evaluate publishes them); resamples where a number is NaN (e.g. one
    class only) are dropped for that number. Returns (lo, hi), or {name: (lo, hi)} for a dict `stat`;
    (NaN, NaN) when n_boot or n is 0 or no resample is defined.
    """
    if n_boot <= 0 or n == 0:
        return float("nan"), float("nan")
    boots = bootstrap_draws(stat, n, n_boot, seed)
    if isinstance(boots[0], dict):
        return {k: draws_interval(boots, k, level) for k in boots[0]}
    return draws_interval(boots, None, level)


def bootstrap_draws(stat: Callable[[np.ndarray], float | dict], n: int, n_boot: int = 1000,
                    seed: int = 0) -> list:
    """`stat` on each of the `n_boot` resamples `bootstrap_ci` draws with that seed. Two statistics drawn with the
    same seed and `n` saw the same resampled pairs, so their draw-by-draw difference is a paired bootstrap
    (`paired_difference_ci`)."""
    rng = np.random.default_rng(seed)
    return [stat(rng.integers(0, n, n)) for _ in range(n_boot)]


def paired_difference_ci(draws_a: list, draws_b: list, key: str | None = None,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a - b over the same resamples (`bootstrap_draws` of two sources with one seed): the
    paired comparison of two generators scored on the same pairs, narrower than their two intervals side by side
    when the pairs' difficulty is shared. `key` picks one number from dict draws; NaN draws are dropped."""
    if len(draws_a) != len(draws_b):
        raise ValueError(f"paired bootstrap: {len(draws_a)} draws against {len(draws_b)}; draw both with one seed")
    pick = (lambda d: d[key]) if key is not None else (lambda d: d)
    return draws_interval([pick(a) - pick(b) for a, b in zip(draws_a, draws_b)], None, level)


def draws_interval(draws: list, key: str | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap draws (of `key` where the draws are dicts); NaN draws are dropped,
    (NaN, NaN) when none is left."""
    return _percentile_interval([d[key] for d in draws] if key is not None else draws, level)


def bootstrap_se(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of `stat(indices)` over `n` pairs resampled with replacement (the same
    resamples as `bootstrap_ci` with that seed); NaN when n_boot or n is 0."""
    if n_boot <= 0 or n == 0:
        return float("nan")
    return float(np.std(bootstrap_draws(stat, n, n_boot, seed)))


def _percentile_interval(values, level: float) -> tuple[float, float]:
    vals = np.array(values, dtype=float)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    a = round((1 - level) / 2, 12)  # 0.025 exactly for level 0.95, not 0.025000000000000022
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
