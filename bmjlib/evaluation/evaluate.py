"""Scoring generated counterfactuals with the judges (paper §4.3, §5.2, §5.4; Tables 1, 3, 4).

For every test pair and every source (each model's counterfactual, plus the real reference follow-up
as the judge-on-reference upper bound, like Table 4's "Reference Image" row) the judges give finding
scores, a retention score (sex at demo scale, race at paper scale), an age and organ masks. From these:

- accuracy: pathology AUROC vs the follow-up's report labels (per finding, mean), and the same over
  only the findings that changed between the two studies;
- retention: sex/race AUROC vs the recorded attribute, age Pearson r vs the recorded age;
- CMIG = sqrt(geomean(accuracy) x geomean(retention)), with the paper's accuracy metric and with the
  changed-finding AUROC in its place;
- KL(judge(reference) || judge(counterfactual)) (App. A.2); anatomy Dice vs the reference's and the
  prior's segmentation; on the phantom SSIM / MS-SSIM / PSNR against the true counterfactual;
- 95 % percentile-bootstrap intervals over pairs for each summary number, and each source's CMIG minus copying
  the prior's and minus the one-stage arm's on the same resamples (a paired bootstrap).

The reference is the registered follow-up (02_registration), i.e. the real follow-up in the prior's
frame, which is what the counterfactual should look like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bmjlib.evaluation import metrics as M
from bmjlib.evaluation.counterfactuals import load_outputs, test_pairs
from bmjlib.evaluation.judges import predict, sex_male
from bmjlib.io import read_image, resize_image
from bmjlib.runtime import resolve
from bmjlib.schema import FINDINGS

REFERENCE = "reference"
# Every source's CMIG is also given as its difference to these, on the same bootstrap resamples (a paired
# comparison: the pairs' shared difficulty cancels, which two intervals side by side do not show).
PAIRED_BASELINES = ("copy_prior", "one_stage")
PAIRED_METRICS = ("cmig", "cmig_changed")
RACE_GROUPS = {"ASIAN": 0, "BLACK": 1, "WHITE": 2}


def _race_index(v) -> float:
    s = str(v).upper()
    for k, i in RACE_GROUPS.items():
        if s.startswith(k):
            return float(i)
    return float("nan")


def finding_labels(pairs: pd.DataFrame, which: str) -> np.ndarray:
    """N x K binarised CheXpert labels (schema.FINDINGS order) of the pairs' `which` study ('prior' or
    'followup')."""
    return np.stack([M.binarize_labels(pairs[f"{which}_{f}"].to_numpy(float)) for f in FINDINGS], 1)


def truth_of(pairs: pd.DataFrame, scale: str = "demo") -> dict:
    """Labels of the test pairs: follow-up and prior findings (binarised CheXpert), retention attribute,
    age."""
    fu, pr = finding_labels(pairs, "followup"), finding_labels(pairs, "prior")
    if scale == "paper":
        ret = pairs["race"].map(_race_index).to_numpy(float)
    else:
        ret = pairs["sex"].map(sex_male).to_numpy(float)
    return {"followup": fu, "prior": pr, "retention": ret, "age": pairs["age"].to_numpy(float)}


def judge_outputs(judges: dict, images: np.ndarray, scale: str = "demo") -> dict:
    """Every judge on the images (`judges.predict`: NaN where the run has no such judge)."""
    ret_kind = "race" if scale == "paper" else "sex"
    return {"finding": predict(judges.get("finding"), images, "finding"),
            "retention": predict(judges.get(ret_kind), images, ret_kind),
            "age": predict(judges.get("age"), images, "age"),
            "masks": predict(judges.get("anatomy"), images, "anatomy")}


def load_sources(run_dir: str | Path, gen_dir: str | Path, pairs: pd.DataFrame, models: list[str], size: int,
                 root: str | Path | None = None) -> dict:
    """Images N,size,size per source: every model, the reference (registered follow-up), the prior,
    and the phantom's true counterfactual when the run has one ('truth', else absent)."""
    run = resolve(run_dir)
    ids = pairs["pair_id"].tolist()
    out = {m: resize_image(load_outputs(gen_dir, m, ids), size) for m in models}
    ref_col = "registered_path" if "registered_path" in pairs else "followup_path"
    # each image resized on its own: a real cohort's images need not share a size
    out[REFERENCE] = np.stack([resize_image(read_image(source_path(p, root)), size) for p in pairs[ref_col]])
    out["prior"] = np.stack([resize_image(read_image(source_path(p, root)), size) for p in pairs["prior_path"]])
    truth = run / "00_phantom" / "truth" / "counterfactual"
    if truth.is_dir() and all((truth / f"{p}.png").is_file() for p in ids):
        out["truth"] = np.stack([resize_image(read_image(truth / f"{p}.png"), size) for p in ids])
    return out


def source_path(p, root=None) -> Path:
    """A path from a pair table: as it is when absolute or no `root` is given, else under `root`."""
    p = Path(str(p))
    return p if p.is_absolute() or root is None else Path(root) / p


def evaluate(run_dir: str | Path, gen_dir: str | Path, judges: dict, models: list[str], size: int,
             scale: str = "demo", n_boot: int = 1000, seed: int = 0, pairs: pd.DataFrame | None = None,
             root: str | Path | None = None, vae=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, per_pair). summary: one row per source (models + 'reference', then 'truth' and 'vae_truth' when
    the run has the phantom's true counterfactuals and a `vae` is given) with every metric and its bootstrap
    interval (`<metric>_lo`, `<metric>_hi`); per_pair: pair-level KL, Dice, fidelity. `vae`: an object with
    `reconstruct(images, size)` (a BiomedJourneyPipeline); 'vae_truth' is the true counterfactual through it,
    the most a latent model with that VAE can score (its CMIG is the ceiling a model's is read against)."""
    pairs = test_pairs(run_dir) if pairs is None else pairs
    ids = pairs["pair_id"].tolist()
    have = [m for m in models if all((Path(gen_dir) / m / f"{p}.png").is_file() for p in ids)]
    imgs = load_sources(run_dir, gen_dir, pairs, have, size, root)
    ceiling = []
    if "truth" in imgs and vae is not None:
        imgs["vae_truth"] = resize_image(vae.reconstruct(imgs["truth"], size), size)
        ceiling = ["truth", "vae_truth"]
    t = truth_of(pairs, scale)
    sources = have + [REFERENCE] + ceiling
    outs = {s: judge_outputs(judges, imgs[s], scale) for s in sources + ["prior"]}
    ref, prior = outs[REFERENCE], outs["prior"]
    rows, per_pair, full, draws = [], [], {}, {}
    for s in sources:
        o = outs[s]
        kl = M.kl_divergence(ref["finding"], o["finding"])
        d_ref = M.mean_dice(o["masks"], ref["masks"])
        d_pri = M.mean_dice(o["masks"], prior["masks"])
        pp = pd.DataFrame({"pair_id": ids, "source": s, "kl": kl, "dice_vs_reference": d_ref,
                           "dice_vs_prior": d_pri})
        if "truth" in imgs and s != "truth":  # the truth against itself: SSIM 1, PSNR infinite, nothing learnt
            pp["ssim"] = M.ssim(imgs[s], imgs["truth"])
            pp["ms_ssim"] = M.ms_ssim(imgs[s], imgs["truth"])
            pp["psnr"] = M.psnr(imgs[s], imgs["truth"])
        per_pair.append(pp)

        def stats(i, o=o, pp=pp):
            path = M.pathology_auroc(o["finding"][i], t["followup"][i], FINDINGS)
            chg = M.changed_auroc(o["finding"][i], t["followup"][i], t["prior"][i], FINDINGS)
            ret = M.retention_auroc(o["retention"][i], t["retention"][i])
            age = M.pearson_r(o["age"][i], t["age"][i])
            r = {"pathology_auroc": path["mean"], "changed_auroc": chg["mean"], "retention_auroc": ret,
                 "age_r": age,
                 "cmig": _cmig(path["mean"], ret, age), "cmig_changed": _cmig(chg["mean"], ret, age),
                 **{f"auroc_{f}": path[f] for f in FINDINGS}, **{f"changed_{f}": chg[f] for f in FINDINGS}}
            for c in ("kl", "dice_vs_reference", "dice_vs_prior", "ssim", "ms_ssim", "psnr"):
                if c in pp:
                    r[c] = float(np.nanmean(pp[c].to_numpy()[i]))
            return r

        full[s] = stats(np.arange(len(ids)))
        row = {"source": s, "n_pairs": len(ids), **full[s]}
        if n_boot > 0 and ids:
            draws[s] = M.bootstrap_draws(stats, len(ids), n_boot, seed)
            for k in full[s]:
                row[f"{k}_lo"], row[f"{k}_hi"] = M.draws_interval(draws[s], k)
        rows.append(row)
    for s, row in zip(sources, rows):
        for base in PAIRED_BASELINES:
            if base not in full or base == s:
                continue
            for k in PAIRED_METRICS:
                col = f"{k}_minus_{base}"
                row[col] = full[s][k] - full[base][k]
                if base in draws:
                    row[f"{col}_lo"], row[f"{col}_hi"] = M.paired_difference_ci(draws[s], draws[base], k)
    return pd.DataFrame(rows), pd.concat(per_pair, ignore_index=True)


def _cmig(acc, ret, age) -> float:
    vals = [acc, ret, age]
    if any(np.isnan(v) for v in vals):
        return float("nan")
    return M.cmig([acc], [ret, age])
